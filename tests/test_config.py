"""The config system: every problem found at once, each with file:line (or --set), key and fix."""

import pytest

from mlxtune.errors import ConfigError
from mlxtune.train.config import TrainConfig, load_train_config


def _problems(tmp_path, yaml_text, overrides=()):
    path = tmp_path / "x.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_train_config(path, list(overrides))
    return e.value.problems, path


@pytest.mark.parametrize("yaml_text, expected", [
    ("lora_parameters:\n  rnak: 8\n", ":2: lora_parameters.rnak: unknown key; did you mean 'rank'?"),
    ("learning_rat: 1e-4\n", ":1: learning_rat: unknown key; did you mean 'learning_rate'?"),
    ("batch_size: four\n", ":1: batch_size: expected an integer, got 'four'"),
    ("batch_size: 0\n", ":1: batch_size: must be at least 1, got 0"),
    ("optimizer: adamww\n", "(did you mean 'adamw'?)"),
    ("lora_parameters:\n  scale: 10\n  alpha: 16\n", "give either alpha"),
    ("fine_tune_type: full\nquantize: {bits: 4}\n", "full fine-tuning needs float weights"),
    ("quantize: {bits: 3}\n", "quantize.bits: expected one of 4, 8, got 3"),
    ("report_to: [tensorbord]\n", "unknown tracker 'tensorbord'; did you mean 'tensorboard'?"),
    ("lora_parameters: 8\n", "lora_parameters: expected a mapping"),
    ("model: [a, b\n", "not valid YAML"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_each_problem_names_file_line_key(tmp_path, yaml_text, expected):
    problems, path = _problems(tmp_path, yaml_text)
    assert len(problems) == 1
    assert problems[0].startswith(str(path)) and expected in problems[0]


def test_all_problems_reported_together(tmp_path):
    problems, _ = _problems(tmp_path, "batch_size: -1\nitres: 5\nlearning_rate: fast\n")
    assert len(problems) == 3
    assert [p.split(": ")[1] for p in problems] == ["batch_size", "itres", "learning_rate"]


def test_defaults_yaml_overrides_precedence(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("learning_rate: 1e-5\nbatch_size: 2\nlora_parameters: {rank: 4}\n")
    config = load_train_config(path, ["batch_size=8", "lora_parameters.keys=[q_proj, v_proj]"])
    assert config.learning_rate == 1e-5  # PyYAML reads 1e-5 as a string; we accept it
    assert config.batch_size == 8 and config.lora_parameters.rank == 4
    assert config.lora_parameters.keys == ["q_proj", "v_proj"]
    assert config.iters == TrainConfig().iters


def test_bad_override_names_the_flag(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("iters: 10\n")
    with pytest.raises(ConfigError) as e:
        load_train_config(path, ["iters=abc", "nokey"])
    assert e.value.problems == [
        "--set nokey: expected key=value, e.g. --set lora_parameters.rank=16",
        "--set: iters: expected an integer, got 'abc'",
    ]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_train_config(tmp_path / "missing.yaml")


def test_alpha_becomes_scale(tmp_path):
    config = load_train_config(None, ["lora_parameters.alpha=32", "lora_parameters.rank=16"])
    assert config.lora_parameters.effective_scale == 2.0
    assert load_train_config(None).lora_parameters.effective_scale == 20.0


def test_mlx_lm_example_config_loads_unchanged(tmp_path, capsys):
    # The keys of mlx-lm's own examples/lora_config.yaml.
    path = tmp_path / "lora_config.yaml"
    path.write_text("""model: "mlx_model"
train: true
fine_tune_type: lora
optimizer: adamw
data: "/path/to/training/data"
seed: 0
num_layers: 16
batch_size: 4
iters: 1000
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
resume_adapter_file: null
adapter_path: "adapters"
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
mask_prompt: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0
lr_schedule:
  name: cosine_decay
  warmup: 100
  warmup_init: 1e-7
  arguments: [1e-5, 1000, 1e-7]
""")
    config = load_train_config(path)
    assert config.optimizer == "adamw" and config.lr_schedule.warmup == 100
    assert config.lr_schedule.arguments == [1e-5, 1000, 1e-7]
    assert capsys.readouterr().err == ""  # train: true is what mlxtune does anyway: no warning


def test_ignored_mlx_lm_keys_warn_once_naming_each(tmp_path, capsys):
    path = tmp_path / "compat.yaml"
    path.write_text("train: false\nclear_cache_threshold: 5\ntrust_remote_code: false\n")
    load_train_config(path)
    load_train_config(path)  # a distributed launch loads the config twice
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {path}: ")
    assert "train (" in err and "clear_cache_threshold (" in err
    assert "trust_remote_code" not in err  # set to what mlxtune does: not ignored


def test_readme_yaml_reference_is_the_schema():
    """The README's table of training keys is describe_schema(TrainConfig), row for row: a key
    added, renamed or re-documented in the config shows up in the README or this fails."""
    import re
    from pathlib import Path

    from mlxtune.config import describe_schema

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### The training YAML", 1)[1].split("\n### ", 1)[0]
    have = [line for line in section.splitlines() if re.match(r"^\| `[\w.]+` \|", line)]
    want = [f"| `{key}` | {f'`{default}`' if default else ''} | {help_} |"
            for key, default, help_ in describe_schema(TrainConfig)]
    assert have == want, "README's YAML table should read:\n" + "\n".join(want)
