"""An Ollama model folder: the fused model as GGUF plus a Modelfile that `ollama create` takes.

Ollama renders prompts with Go's text/template, not Jinja, so the model's chat template is
translated. Rather than parse Jinja, we render it with marker messages and read off the text
around each marker: what comes before the system prompt, between system and user, user and
assistant, assistant and the next user, and the generation prompt. Those pieces become a Go
template over Ollama's .System and .Messages that yields the same text as the Jinja template for
any conversation of system?, (user, assistant)*, user — the shape every chat request has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mlxtune.errors import MlxtuneError

_SYS, _U1, _A1, _U2 = "\x01SYSTEM\x01", "\x01USER1\x01", "\x01ASSISTANT1\x01", "\x01USER2\x01"
# Ollama's num_ctx: the model's context, capped so a long-context model does not reserve a huge
# KV cache by default (the user raises it with PARAMETER num_ctx or /set parameter).
_MAX_CTX = 4096


@dataclass
class ChatPieces:
    """The literal text the chat template puts around each message."""

    system_head: str | None  # before the system prompt; None: the template takes no system
    system_tail: str  # after it, before the first user prefix
    default_head: str  # before the first user prefix when there is no system prompt
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation: str  # what add_generation_prompt appends


def _render(tokenizer, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation)


def _common_suffix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return a[len(a) - n:]


def _between(text: str, start: str, end: str) -> str:
    i = text.index(start) + len(start)
    return text[i:text.index(end, i)]


def chat_pieces(tokenizer) -> ChatPieces:
    """Read the chat template's pieces off renders of marker conversations, and check that they
    rebuild the template's own renders of other conversations."""
    turns = [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1},
             {"role": "user", "content": _U2}]
    try:
        plain = _render(tokenizer, turns, True)
        alone = _render(tokenizer, turns[:1], False)
    except Exception as e:  # a template error is the model's, so say what it was
        raise MlxtuneError(f"--ollama: the chat template does not render a user/assistant "
                           f"conversation: {e}") from None
    if any(m not in plain for m in (_U1, _A1, _U2)):
        raise MlxtuneError("--ollama: the chat template drops message text; write the "
                           "Modelfile's TEMPLATE by hand")
    try:
        with_sys = _render(tokenizer, [{"role": "system", "content": _SYS}, *turns], True)
    except Exception:
        with_sys = None  # templates that refuse a system message
    head = plain[:plain.index(_U1)]
    user_to_assistant = _between(plain, _U1, _A1)
    assistant_to_user = _between(plain, _A1, _U2)
    tail = plain[plain.index(_U2) + len(_U2):]
    user_suffix = alone[alone.index(_U1) + len(_U1):]
    if not (tail.startswith(user_suffix) and user_to_assistant.startswith(user_suffix)):
        user_suffix = ""
    # Between two messages comes the first's suffix and the second's prefix; where that text is
    # cut does not change what renders, so the user prefix is what every way into a user turn
    # (the start, after the system prompt, after an assistant turn) ends with.
    ways_in = [head, assistant_to_user]
    system = with_sys if with_sys and _SYS in with_sys and _U1 in with_sys \
        and with_sys.endswith(plain[plain.index(_U1):]) else None
    if system:
        ways_in.append(_between(system, _SYS, _U1))
    # Prefer the cut where an assistant turn ends as a user turn does (the usual case), so the
    # pieces read like the template's own; else the longest text all ways in share.
    prefix = assistant_to_user[len(user_suffix):]
    if not (assistant_to_user.startswith(user_suffix) and all(w.endswith(prefix)
                                                               for w in ways_in)):
        prefix = ways_in[0]
        for way in ways_in[1:]:
            prefix = _common_suffix(prefix, way)

    def cut(text: str) -> str:
        return text[:len(text) - len(prefix)]

    pieces = ChatPieces(
        system_head=system[:system.index(_SYS)] if system else None,
        system_tail=cut(_between(system, _SYS, _U1)) if system else "",
        default_head=cut(head), user_prefix=prefix, user_suffix=user_suffix,
        assistant_prefix=user_to_assistant[len(user_suffix):],
        assistant_suffix=cut(assistant_to_user), generation=tail[len(user_suffix):])
    _check_pieces(tokenizer, pieces)
    return pieces


def assemble(p: ChatPieces, messages: list[dict]) -> str:
    """What the Go template renders for `messages` (in Python, to check the pieces against the
    Jinja template; Ollama passes system messages as .System and keeps them out of the turns)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = [f"{p.system_head}{system}{p.system_tail}" if system and p.system_head is not None
           else p.default_head]
    for m in messages:
        if m["role"] == "user":
            out.append(f"{p.user_prefix}{m['content']}{p.user_suffix}")
        elif m["role"] == "assistant":
            out.append(f"{p.assistant_prefix}{m['content']}{p.assistant_suffix}")
    return "".join(out) + p.generation


def _check_pieces(tokenizer, pieces: ChatPieces) -> None:
    """Refuse pieces that do not rebuild the template's render of a few other conversations."""
    convs = [[{"role": "user", "content": "Hi there"}],
             [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b c"},
              {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"},
              {"role": "user", "content": "f"}]]
    if pieces.system_head is not None:
        convs += [[{"role": "system", "content": "Be brief."}, *c] for c in convs]
    for conv in convs:
        if assemble(pieces, conv) != _render(tokenizer, conv, True):
            raise MlxtuneError("--ollama: this chat template changes from turn to turn in a way "
                               "a Modelfile TEMPLATE built from its pieces cannot follow; "
                               "write the TEMPLATE by hand")


def go_template(p: ChatPieces) -> str:
    """The pieces as a Go text/template over Ollama's .System and .Messages."""
    for text in vars(p).values():
        if text and ("{{" in text or "}}" in text or '"""' in text):
            raise MlxtuneError("--ollama: the chat template's text holds '{{', '}}' or '\"\"\"', "
                               "which a Modelfile TEMPLATE cannot; write it by hand")
    if p.system_head is None:
        head = p.default_head
    else:
        otherwise = f"{{{{ else }}}}{p.default_head}" if p.default_head else ""
        head = (f"{{{{ if .System }}}}{p.system_head}{{{{ .System }}}}{p.system_tail}"
                f"{otherwise}{{{{ end }}}}")
    return (f"{head}{{{{ range .Messages }}}}"
            f"{{{{ if eq .Role \"user\" }}}}{p.user_prefix}{{{{ .Content }}}}{p.user_suffix}"
            f"{{{{ else if eq .Role \"assistant\" }}}}{p.assistant_prefix}{{{{ .Content }}}}"
            f"{p.assistant_suffix}{{{{ end }}}}{{{{ end }}}}{p.generation}")


def stop_tokens(tokenizer, folder: Path, pieces: ChatPieces) -> list[str]:
    """The end-of-sequence tokens, and any special token that ends an assistant turn."""
    ids = []
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    stops += [t for t in tokenizer.convert_ids_to_tokens(ids) if t]
    stops += [t for t in getattr(tokenizer, "all_special_tokens", [])
              if t and t in pieces.assistant_suffix]
    return list(dict.fromkeys(stops))


def modelfile(gguf_name: str, tokenizer, folder: Path) -> str:
    """The Modelfile text for the fused model folder `folder` exported as `gguf_name`."""
    from mlxtune.models.folder import read_config

    pieces = chat_pieces(tokenizer)
    config = read_config(folder)
    lines = ["# Written by mlxtune fuse --ollama. In this folder: ollama create NAME -f Modelfile",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{go_template(pieces)}"""']
    for stop in stop_tokens(tokenizer, folder, pieces):
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    ctx = config.get("max_position_embeddings")
    if isinstance(ctx, int):
        lines.append(f"PARAMETER num_ctx {min(ctx, _MAX_CTX)}")
    gen = folder / "generation_config.json"
    if gen.is_file():
        settings = json.loads(gen.read_text())
        for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
            if isinstance(settings.get(key), (int, float)) and not isinstance(settings[key], bool):
                name = "repeat_penalty" if key == "repetition_penalty" else key
                lines.append(f"PARAMETER {name} {settings[key]}")
    return "\n".join(lines) + "\n"


def write_ollama(folder: Path, out: Path, gguf_type: str = "q8_0") -> Path:
    """Write `out`/model.gguf and `out`/Modelfile for fused model folder `folder`, atomically."""
    from mlx_lm.utils import load_tokenizer

    from mlxtune.gguf_export import write_gguf
    from mlxtune.atomic import atomic_folder

    text = modelfile("model.gguf", load_tokenizer(folder), folder)  # template errors first
    with atomic_folder(Path(out)) as tmp:
        write_gguf(folder, tmp / "model.gguf", gguf_type)
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
    return Path(out)
