"""mlxtune fuse --ollama: a GGUF and a Modelfile whose TEMPLATE renders, in Go's own text/template
(the engine Ollama uses), exactly what the model's Jinja chat template renders."""

import json
import os
import re
import shutil
import subprocess

import pytest

from mlxtune.errors import MlxtuneError
from mlxtune.fuse import fuse
from mlxtune.ollama import assemble, chat_pieces
from tests.adapters import answer_adapters

CONVERSATIONS = [
    [{"role": "user", "content": "quick brown fox"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "Ada, 36"},
     {"role": "assistant", "content": '{"name": "Ada"}'}, {"role": "user", "content": "and Bo?"}],
    [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"},
     {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"},
     {"role": "user", "content": "f"}],
]

# Ollama's template data: .System (the system messages joined) and .Messages, whose items have
# Role and Content (api.Message); its Modelfile keeps a """ block's text as it is.
GO_RENDER = r"""
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string
	Content string
}

func main() {
	modelfile, _ := os.ReadFile(os.Args[1])
	text := string(modelfile)
	start := strings.Index(text, "TEMPLATE \"\"\"") + len("TEMPLATE \"\"\"")
	body := text[start:]
	body = body[:strings.Index(body, "\"\"\"")]
	tmpl := template.Must(template.New("t").Parse(body))
	var convs [][]Message
	data, _ := os.ReadFile(os.Args[2])
	if err := json.Unmarshal(data, &convs); err != nil {
		panic(err)
	}
	var outs []string
	for _, msgs := range convs {
		var system []string
		for _, m := range msgs {
			if m.Role == "system" {
				system = append(system, m.Content)
			}
		}
		var b strings.Builder
		err := tmpl.Execute(&b, map[string]any{"System": strings.Join(system, "\n\n"),
			"Messages": msgs})
		if err != nil {
			panic(err)
		}
		outs = append(outs, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(outs)
}
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_qmodel_dir):
    folder = tmp_path_factory.mktemp("ollama")
    runs = answer_adapters(folder / "adapters", tiny_qmodel_dir)
    lines = []
    result = fuse(folder / "fused", run=runs["json-bot"], ollama=folder / "ollama",
                  gguf_type="q8_0", say=lines.append)
    return result, lines


def test_ollama_folder_holds_a_gguf_and_a_modelfile(exported):
    from gguf import GGUFReader

    result, lines = exported
    assert sorted(p.name for p in result.ollama.iterdir()) == ["Modelfile", "model.gguf"]
    text = (result.ollama / "Modelfile").read_text()
    directives = [line.split(" ", 1)[0] for line in text.splitlines()
                  if re.match(r"^[A-Z]+ ", line)]
    assert directives == ["FROM", "TEMPLATE", "PARAMETER", "PARAMETER"]
    assert "FROM ./model.gguf\n" in text
    assert 'PARAMETER stop "<|im_end|>"\n' in text and "PARAMETER num_ctx 512\n" in text
    reader = GGUFReader(str(result.ollama / "model.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0"
    assert any("ollama create NAME -f" in line for line in lines)


def _check_pieces_rebuild(folder):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(folder)
    pieces = chat_pieces(tok)
    for conv in CONVERSATIONS:
        want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert assemble(pieces, conv) == want
    return pieces


def test_pieces_rebuild_the_jinja_template(tiny_qmodel_dir):
    pieces = _check_pieces_rebuild(tiny_qmodel_dir)
    assert (pieces.system_head, pieces.system_tail) == ("<|im_start|>system\n", "<|im_end|>\n")


@pytest.mark.slow
def test_pieces_rebuild_smollm2s_template_and_its_default_system_prompt(builtin_model_dir):
    pieces = _check_pieces_rebuild(builtin_model_dir)
    # SmolLM2's template adds its own system prompt when none is given: so does ours.
    assert "named SmolLM" in pieces.default_head and pieces.user_prefix == "<|im_start|>user\n"


@pytest.mark.skipif(shutil.which("go") is None, reason="Go (golang-go) is not installed: "
                    "scripts/setup.sh installs it")
def test_modelfile_template_renders_in_go_as_the_jinja_template(exported, tmp_path):
    from mlx_lm.utils import load_tokenizer

    result, _ = exported
    (tmp_path / "render.go").write_text(GO_RENDER)
    (tmp_path / "convs.json").write_text(json.dumps(CONVERSATIONS))
    env = dict(os.environ, GOCACHE=str(tmp_path / "gocache"), GOPATH=str(tmp_path / "gopath"),
               GOFLAGS="", GO111MODULE="off")
    proc = subprocess.run(["go", "run", str(tmp_path / "render.go"),
                           str(result.ollama / "Modelfile"), str(tmp_path / "convs.json")],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    tok = load_tokenizer(result.out)
    assert json.loads(proc.stdout) == [
        tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in CONVERSATIONS]


def test_a_template_that_varies_by_turn_is_refused_before_fusing():
    class Tok:
        # Numbers each user turn: no fixed prefix can say that.
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            users = iter(range(1, 100))
            return "".join(f"[{m['role']} {next(users) if m['role'] == 'user' else ''}]"
                           f"{m['content']}" for m in messages) + "[assistant]"

    with pytest.raises(MlxtuneError, match="changes from turn to turn"):
        chat_pieces(Tok())
