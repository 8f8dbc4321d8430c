"""The playground page at `/`: chat with two served models side by side (say, the base and its
fine-tune), streamed from the server's own chat endpoint. One static HTML file with its script
inline: no build step, nothing fetched from elsewhere, so it works on an offline machine."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

# The page reads nothing of the server but the public API, which keeps its key checks.
PUBLIC_PATHS = ("/",)


def playground_html() -> str:
    """The page's HTML, as packaged with mlxtune."""
    return files("mlxtune.serve").joinpath("static/playground.html").read_text(encoding="utf-8")


def add_playground(app: FastAPI) -> None:
    """Serve the playground at `/` of `app`."""
    page = playground_html()  # read once: a broken install fails at start, not on first visit

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})
