"""rlhfkit.config: typed configs from YAML and key=value overrides, and their error messages."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import pytest

from rlhfkit.config import describe, load_config, opt, section
from rlhfkit.errors import ConfigError
from rlhfkit.models.load import LoraConfig, ModelConfig
from rlhfkit.recipes.sft import SFTConfig, SFTDataConfig
from rlhfkit.runtime.optim import TrainConfig

TRAIN_KEYS = (
    "adam_beta1, adam_beta2, adam_eps, batch_size, epochs, eval_batch_size, eval_every, grad_accum, log_every, "
    "lr, max_grad_norm, max_nonfinite_skips, max_steps, min_lr_ratio, mixed_precision, on_nonfinite, save_every, "
    "save_total_limit, scheduler, warmup_ratio, warmup_steps, weight_decay"
)


def write_yaml(tmp_path, text: str):
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(*args, **kwargs) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, *args, **kwargs)
    return info.value


# --------------------------------------------------------------------------------------------------
# Loading values


def test_defaults_load():
    cfg = load_config(SFTConfig)
    assert cfg == SFTConfig()
    assert cfg.output_dir == "runs/sft"
    assert cfg.seed == 42
    assert cfg.sample_prompts == []
    assert cfg.model.name == "bundled:smollm2-135m-instruct"
    assert cfg.lora.enabled is False
    assert cfg.lora.target_modules == ["all-linear"]
    assert cfg.data.train == "bundled:instructions"
    assert cfg.data.on_error == "error"
    assert cfg.train.lr == 2e-5
    assert cfg.train.batch_size == 8


def test_list_defaults_are_not_shared_between_instances():
    a, b = SFTConfig(), SFTConfig()
    a.lora.target_modules.append("q_proj")
    a.sample_prompts.append("hi")
    assert b.lora.target_modules == ["all-linear"]
    assert b.sample_prompts == []


def test_yaml_values(tmp_path):
    path = write_yaml(
        tmp_path,
        "output_dir: out/run1\nseed: 7\nsample_prompts: [hello, world]\n"
        "model:\n  name: tiny:llama\n  dtype: bfloat16\n"
        "lora:\n  enabled: true\n  r: 4\n  target_modules: [q_proj, v_proj]\n"
        "data:\n  train: data.jsonl\n  packing: true\n"
        "train:\n  lr: 0.001\n  batch_size: 2\n  epochs: 3\n",
    )
    cfg = load_config(SFTConfig, path)
    assert cfg.output_dir == "out/run1"
    assert cfg.seed == 7
    assert cfg.sample_prompts == ["hello", "world"]
    assert cfg.model.name == "tiny:llama"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.model.device == "auto"  # untouched keys keep their default
    assert cfg.lora.enabled is True
    assert cfg.lora.r == 4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.train == "data.jsonl"
    assert cfg.data.packing is True
    assert cfg.train.lr == 0.001
    assert cfg.train.batch_size == 2
    assert cfg.train.epochs == 3.0 and isinstance(cfg.train.epochs, float)


def test_empty_yaml_gives_defaults(tmp_path):
    assert load_config(SFTConfig, write_yaml(tmp_path, "")) == SFTConfig()


def test_yaml_scientific_lr_without_dot_is_a_float(tmp_path):
    # PyYAML reads `1e-4` as the string "1e-4" (YAML 1.1 needs a dot); it must still load as a float.
    path = write_yaml(tmp_path, "train:\n  lr: 1e-4\n")
    cfg = load_config(SFTConfig, path)
    assert cfg.train.lr == 1e-4
    assert isinstance(cfg.train.lr, float)


def test_cli_overrides_with_dotted_keys():
    cfg = load_config(
        SFTConfig,
        overrides=["seed=3", "model.name=tiny:qwen2", "lora.r=8", "data.max_length=64", "train.grad_accum=4"],
    )
    assert cfg.seed == 3
    assert cfg.model.name == "tiny:qwen2"
    assert cfg.lora.r == 8
    assert cfg.data.max_length == 64
    assert cfg.train.grad_accum == 4


def test_cli_overrides_win_over_yaml(tmp_path):
    path = write_yaml(tmp_path, "seed: 1\ntrain:\n  lr: 0.5\n  batch_size: 2\n")
    cfg = load_config(SFTConfig, path, ["train.lr=0.25", "seed=9"])
    assert cfg.train.lr == 0.25
    assert cfg.seed == 9
    assert cfg.train.batch_size == 2  # from the YAML, not overridden


def test_cli_key_may_start_with_dashes():
    assert load_config(SFTConfig, overrides=["--train.batch_size=3"]).train.batch_size == 3


def test_cli_value_may_contain_equals_sign():
    assert load_config(SFTConfig, overrides=["data.train=a=b.jsonl"]).data.train == "a=b.jsonl"


@pytest.mark.parametrize(
    ("override", "getter", "expected"),
    [
        ("train.batch_size=16", lambda c: c.train.batch_size, 16),
        ("train.max_steps=1_000", lambda c: c.train.max_steps, 1000),
        ("train.lr=0.5", lambda c: c.train.lr, 0.5),
        ("train.lr=1e-4", lambda c: c.train.lr, 1e-4),
        ("train.epochs=2", lambda c: c.train.epochs, 2.0),
        ("lora.enabled=true", lambda c: c.lora.enabled, True),
        ("lora.enabled=True", lambda c: c.lora.enabled, True),
        ("overwrite=yes", lambda c: c.overwrite, True),
        ("progress=false", lambda c: c.progress, False),
        ("progress=0", lambda c: c.progress, False),
        ("lora.target_modules=q_proj,v_proj", lambda c: c.lora.target_modules, ["q_proj", "v_proj"]),
        ("lora.target_modules=[q_proj, v_proj]", lambda c: c.lora.target_modules, ["q_proj", "v_proj"]),
        ("lora.target_modules=q_proj", lambda c: c.lora.target_modules, ["q_proj"]),
        ("sample_prompts=", lambda c: c.sample_prompts, []),
        ("data.truncation=error", lambda c: c.data.truncation, "error"),
        ("train.scheduler=linear", lambda c: c.train.scheduler, "linear"),
        ("model.dtype=float16", lambda c: c.model.dtype, "float16"),
        ("output_dir=123", lambda c: c.output_dir, "123"),
    ],
)
def test_cli_type_coercion(override, getter, expected):
    value = getter(load_config(SFTConfig, overrides=[override]))
    assert value == expected
    assert type(value) is type(expected)


def test_cli_float_field_gets_a_float_not_an_int():
    cfg = load_config(SFTConfig, overrides=["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


# --------------------------------------------------------------------------------------------------
# Errors


def test_unknown_key_on_command_line_suggests_closest():
    err = error_of(overrides=["train.lrr=0.1"])
    assert str(err) == (
        "command line: config key 'train.lrr': unknown key; did you mean 'train.lr'? "
        f"(known keys here: {TRAIN_KEYS})"
    )
    assert err.key == "train.lrr"
    assert err.source == "command line"


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "train:\n  batch_sise: 4\n")
    err = error_of(path)
    assert str(err) == (
        f"{path}: config key 'train.batch_sise': unknown key; did you mean 'train.batch_size'? "
        f"(known keys here: {TRAIN_KEYS})"
    )


def test_unknown_top_level_key_without_close_match():
    err = error_of(overrides=["zzzz=1"])
    known = ", ".join(sorted(f.name for f in dataclasses.fields(SFTConfig)))
    assert str(err) == f"command line: config key 'zzzz': unknown key (known keys here: {known})"


def test_cli_int_given_text():
    err = error_of(overrides=["train.batch_size=abc"])
    assert str(err) == "command line: config key 'train.batch_size': expected an integer, got 'abc'"
    assert err.key == "train.batch_size"


def test_cli_int_given_a_fraction():
    err = error_of(overrides=["train.batch_size=2.5"])
    assert str(err) == "command line: config key 'train.batch_size': expected an integer, got '2.5'"


def test_cli_int_given_a_bool():
    err = error_of(overrides=["train.batch_size=true"])
    assert str(err) == "command line: config key 'train.batch_size': expected an integer, got 'true'"


def test_yaml_int_given_a_fraction(tmp_path):
    path = write_yaml(tmp_path, "train:\n  batch_size: 2.5\n")
    err = error_of(path)
    assert str(err) == f"{path}: config key 'train.batch_size': expected an integer, got '2.5'"
    assert err.source == str(path)


def test_yaml_int_given_a_bool(tmp_path):
    path = write_yaml(tmp_path, "train:\n  batch_size: true\n")
    err = error_of(path)
    assert str(err) == f"{path}: config key 'train.batch_size': expected an integer, got 'True'"


def test_yaml_int_given_a_whole_float_is_accepted(tmp_path):
    cfg = load_config(SFTConfig, write_yaml(tmp_path, "train:\n  batch_size: 4.0\n"))
    assert cfg.train.batch_size == 4 and isinstance(cfg.train.batch_size, int)


def test_yaml_float_given_a_bool(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: true\n")
    assert str(error_of(path)) == f"{path}: config key 'train.lr': expected a number, got 'True'"


def test_yaml_float_given_text(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: fast\n")
    assert str(error_of(path)) == f"{path}: config key 'train.lr': expected a number, got 'fast'"


def test_cli_float_rejects_nan():
    err = error_of(overrides=["train.lr=nan"])
    assert str(err) == "command line: config key 'train.lr': expected a number, got 'nan'"


def test_cli_bool_given_text():
    err = error_of(overrides=["lora.enabled=maybe"])
    assert str(err) == "command line: config key 'lora.enabled': expected true or false, got 'maybe'"


def test_yaml_bool_given_a_quoted_string(tmp_path):
    path = write_yaml(tmp_path, 'lora:\n  enabled: "true"\n')
    assert str(error_of(path)) == f"{path}: config key 'lora.enabled': expected true or false, got 'true'"


def test_yaml_list_given_a_scalar(tmp_path):
    path = write_yaml(tmp_path, "lora:\n  target_modules: 3\n")
    assert str(error_of(path)) == f"{path}: config key 'lora.target_modules': expected a list of strings, got '3'"


def test_yaml_list_item_of_wrong_type_names_the_index(tmp_path):
    path = write_yaml(tmp_path, "lora:\n  target_modules: [q_proj, [a]]\n")
    err = error_of(path)
    assert str(err) == f"{path}: config key 'lora.target_modules[1]': expected a string, got \"['a']\""


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.lr=-1", "train.lr", "expected a value > 0.0, got -1.0"),
        ("train.lr=0", "train.lr", "expected a value > 0.0, got 0.0"),
        ("train.batch_size=0", "train.batch_size", "expected a value > 0, got 0"),
        ("lora.dropout=1.5", "lora.dropout", "expected a value < 1.0, got 1.5"),
        ("lora.dropout=-0.1", "lora.dropout", "expected a value >= 0.0, got -0.1"),
        ("train.min_lr_ratio=2", "train.min_lr_ratio", "expected a value <= 1.0, got 2.0"),
        ("data.max_length=1", "data.max_length", "expected a value > 1, got 1"),
    ],
)
def test_out_of_range_on_command_line(override, key, expected):
    err = error_of(overrides=[override])
    assert str(err) == f"command line: config key '{key}': {expected}"
    assert err.key == key


def test_out_of_range_in_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "lora:\n  dropout: 1.5\n")
    assert str(error_of(path)) == f"{path}: config key 'lora.dropout': expected a value < 1.0, got 1.5"


def test_bad_literal_suggests_closest():
    err = error_of(overrides=["data.truncation=rigth"])
    assert str(err) == (
        "command line: config key 'data.truncation': expected one of 'right', 'error', got 'rigth' "
        "(did you mean 'right'?)"
    )


def test_bad_literal_without_close_match(tmp_path):
    path = write_yaml(tmp_path, "train:\n  scheduler: 5\n")
    assert str(error_of(path)) == (
        f"{path}: config key 'train.scheduler': expected one of 'cosine', 'linear', 'constant', got 5"
    )


def test_section_given_a_scalar_in_yaml(tmp_path):
    path = write_yaml(tmp_path, "model: 3\n")
    err = error_of(path)
    assert str(err) == f"{path}: config key 'model': expected a section (mapping of keys), got 3"
    assert err.key == "model"


def test_section_given_a_scalar_on_command_line():
    err = error_of(overrides=["train=5"])
    assert str(err) == "command line: config key 'train': expected a section (mapping of keys), got '5'"


def test_cli_dotted_override_replaces_a_scalar_section_from_yaml(tmp_path):
    path = write_yaml(tmp_path, "model: 3\n")
    assert load_config(SFTConfig, path, ["model.name=tiny:llama"]).model.name == "tiny:llama"


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, kind):
    path = write_yaml(tmp_path, text)
    err = error_of(path)
    assert str(err) == f"config key '--config': {path} must hold a mapping of keys to values, got {kind}"


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    err = error_of(path)
    assert str(err) == f"config key '--config': file not found: {path}"
    assert err.key == "--config"


def test_invalid_yaml(tmp_path):
    path = write_yaml(tmp_path, "train:\n  lr: [1, 2\n")
    message = str(error_of(path))
    assert message.startswith(f"config key '--config': {path} is not valid YAML: ")
    assert re.search(r"line \d+", message)


def test_config_file_not_utf8(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"seed: \xff\xfe\n")
    assert str(error_of(path)) == f"config key '--config': {path} is not valid UTF-8"


def test_override_without_equals():
    err = error_of(overrides=["train.lr"])
    assert str(err) == (
        "config key 'train.lr': command-line overrides must look like key=value (e.g. train.lr=1e-4)"
    )


def test_section_validate_errors_get_the_full_dotted_key():
    err = error_of(overrides=["lora.enabled=true", "lora.target_modules="])
    assert str(err) == (
        "command line: config key 'lora.target_modules': expected at least one module name (or all-linear)"
    )
    assert err.key == "lora.target_modules"


def test_section_validate_error_from_yaml(tmp_path):
    path = write_yaml(tmp_path, "model:\n  device: tpu\n")
    assert str(error_of(path)) == (
        f"{path}: config key 'model.device': expected auto, cpu, cuda, cuda:N or mps, got 'tpu'"
    )


def test_top_level_validate():
    err = error_of(overrides=["output_dir= "])
    assert str(err) == "command line: config key 'output_dir': expected a folder path for the run"


def test_errors_are_rlhfkit_errors_with_exit_code_2():
    err = error_of(overrides=["train.lr=-1"])
    assert err.exit_code == 2
    assert err.reason == "expected a value > 0.0, got -1.0"


# --------------------------------------------------------------------------------------------------
# opt / section on a small config


@dataclass
class _Inner:
    k: int = opt(1, "inner k", ge=0, le=10)


@dataclass
class _Outer:
    names: list[str] = opt(["a"], "some names")
    inner: _Inner = section(_Inner, "the inner section")


def test_opt_records_help_and_bounds():
    (k,) = dataclasses.fields(_Inner)
    assert k.default == 1
    assert k.metadata["help"] == "inner k"
    assert (k.metadata["ge"], k.metadata["le"], k.metadata["gt"], k.metadata["lt"]) == (0, 10, None, None)


def test_section_and_list_defaults_are_fresh_per_instance():
    a, b = _Outer(), _Outer()
    assert a.inner is not b.inner
    assert a.names is not b.names
    assert dataclasses.fields(_Outer)[1].metadata["help"] == "the inner section"


def test_small_config_bounds_and_overrides():
    assert load_config(_Outer, overrides=["inner.k=10", "names=x,y"]) == _Outer(["x", "y"], _Inner(10))
    with pytest.raises(ConfigError) as info:
        load_config(_Outer, overrides=["inner.k=11"])
    assert str(info.value) == "command line: config key 'inner.k': expected a value <= 10, got 11"


# --------------------------------------------------------------------------------------------------
# describe


@pytest.mark.parametrize("cls", [SFTConfig, ModelConfig, LoraConfig, SFTDataConfig, TrainConfig])
def test_describe_lists_every_field_with_its_help(cls):
    text = describe(cls)
    lines = text.splitlines()
    for f in dataclasses.fields(cls):
        assert any(line.strip().startswith(f"{f.name}:") for line in lines), f.name
        assert f"# {f.metadata['help']}" in text, f.name


def test_describe_sft_config_covers_nested_sections():
    text = describe(SFTConfig)
    for sub in (ModelConfig, LoraConfig, SFTDataConfig, TrainConfig):
        for f in dataclasses.fields(sub):
            assert f"\n  {f.name}:" in text, f.name
            assert f"  # {f.metadata['help']}" in text, f.name
    assert "# model to fine-tune\nmodel:\n" in text
    assert "# optimization\ntrain:\n" in text
    assert "# peak learning rate [a number]\n  lr: 2.0e-05" in text
    assert "  truncation: right" in text
    assert "[one of 'right', 'error']" in text
    assert "  target_modules: [all-linear]" in text


def test_describe_of_an_instance_shows_its_values():
    cfg = load_config(SFTConfig, overrides=["train.batch_size=3"])
    assert "\n  batch_size: 3\n" in describe(cfg)


# --------------------------------------------------------------------------------------------------
# lora.target_modules checked against the model


def test_apply_lora_unknown_target_module(tokenizer):
    from rlhfkit.models.load import apply_lora
    from rlhfkit.models.tiny import build_tiny

    model = build_tiny("llama", tokenizer)
    with pytest.raises(ConfigError) as info:
        apply_lora(model, LoraConfig(enabled=True, target_modules=["nope"]))
    assert info.value.key == "lora.target_modules"
    assert str(info.value) == (
        "config key 'lora.target_modules': nope not found in LlamaForCausalLM; its linear layers are: "
        "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    )


def test_apply_lora_known_target_modules(tokenizer):
    from rlhfkit.models.load import apply_lora
    from rlhfkit.models.tiny import build_tiny

    model = apply_lora(build_tiny("llama", tokenizer), LoraConfig(enabled=True, r=2, target_modules=["q_proj"]))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "q_proj" in n for n in names)


def test_partial_section_override_keeps_the_recipe_defaults() -> None:
    """Overriding one key of a section keeps the recipe's own defaults for the others (PPO's train
    section defaults differ from TrainConfig's)."""
    from rlhfkit.recipes.ppo import PPOConfig

    cfg = load_config(PPOConfig, None, ["train.lr=0.1"])
    assert cfg.train.lr == 0.1 and cfg.train.scheduler == "constant" and cfg.train.max_steps == 100


def test_a_mapping_field_takes_a_yaml_mapping_on_the_command_line():
    from rlhfkit.gym.common import EnvConfig  # noqa: F401 - a dataclass with a dict field (kwargs)
    from rlhfkit.gym.ppo import GymPPOConfig

    cfg = load_config(GymPPOConfig, None, ["env.kwargs={render_mode: rgb_array, sutton_barto_reward: true}"])
    assert cfg.env.kwargs == {"render_mode": "rgb_array", "sutton_barto_reward": True}
    with pytest.raises(ConfigError, match="env.kwargs"):
        load_config(GymPPOConfig, None, ["env.kwargs=not a mapping"])
