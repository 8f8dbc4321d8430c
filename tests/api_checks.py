"""A schemathesis check for tests/test_api_schema.py (loaded through SCHEMATHESIS_HOOKS by the
schemathesis command): every error answer is in OpenAI's shape."""

import json

import schemathesis

ERROR_FIELDS = {"message", "type", "param", "code"}


@schemathesis.check
def openai_error_shape(ctx, response, case):
    """Every 4xx and 5xx: {"error": {"message", "type", "param", "code"}} with a message; a 429
    says when to retry."""
    if response.status_code < 400:
        return None
    body = json.loads(response.text)
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert response.status_code != 429 or response.headers.get("retry-after"), response.headers
    return True
