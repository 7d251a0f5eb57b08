"""tunekit.config.validate: every problem in one error, each naming its key and a fix."""

import pytest
from omegaconf import OmegaConf

from tunekit.config import ConfigError, validate

THIS = __name__


def takes_kwargs(a, b, **extra):
    return a, b, extra


def needs_tokenizer(tokenizer, source, *, max_seq_len=None):
    return tokenizer, source, max_seq_len


def problems_of(yaml_text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(OmegaConf.create(yaml_text), source="x.yaml")
    assert str(info.value).startswith("x.yaml: ")
    return info.value.problems


def test_valid_config_passes():
    validate(OmegaConf.create(f"""
    lr: 0.1
    optimizer: {{_component_: torch.optim.AdamW, lr: '${{lr}}', betas: [0.9, 0.95]}}
    dataset: {{_component_: {THIS}.needs_tokenizer, source: data.jsonl}}
    sched: {{_component_: torch.optim.lr_scheduler.StepLR, step_size: '???'}}
    extra: {{_component_: {THIS}.takes_kwargs, b: 1, anything: 2}}
    """))


def test_unknown_argument_suggests_the_closest():
    assert problems_of("optimizer: {_component_: torch.optim.AdamW, lrr: 0.1}") == [
        "optimizer.lrr: no such argument of torch.optim.AdamW; did you mean lr?"]


def test_missing_required_argument_but_not_the_injected_first_one():
    assert problems_of("sched: {_component_: torch.optim.lr_scheduler.StepLR}") == [
        "sched.step_size: required argument of torch.optim.lr_scheduler.StepLR is missing; "
        "add it to the config or pass sched.step_size=..."]


def test_unimportable_component_suggestions(tmp_path, monkeypatch):
    pkg = tmp_path / "fakemodels"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "llama3_2.py").write_text("def llama3_2_1b():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert problems_of("model: {_component_: fakemodels.llama3_2_1bb}") == [
        "model._component_: cannot import fakemodels.llama3_2_1bb; did you mean fakemodels.llama3_2.llama3_2_1b?"]
    assert problems_of("o: {_component_: torch.optimm.AdamW}") == [
        "o._component_: cannot import torch.optimm.AdamW; did you mean torch.optim.AdamW?"]
    assert problems_of("o: {_component_: nosuchpackage.x}") == [
        "o._component_: cannot import nosuchpackage.x: no module named 'nosuchpackage'"]


def test_all_problems_collected_in_one_error():
    problems = problems_of(f"""
    output_dir: ???
    bad: ${{nope}}
    asset: ${{asset:nope_asset}}
    optimizer: {{_component_: torch.optim.AdamW, lrr: 0.1}}
    nested:
      - {{_component_: {THIS}.takes_kwargs, a: 1}}
    """)
    assert len(problems) == 5
    assert problems[0] == "output_dir: value is missing (???); set it on the command line: output_dir=..."
    assert problems[1].startswith("bad: ") and "nope" in problems[1]
    assert problems[2].startswith("asset: ") and "no shipped asset 'nope_asset'" in problems[2]
    assert problems[3].startswith("optimizer.lrr: no such argument")
    assert problems[4].startswith(f"nested.0.b: required argument of {THIS}.takes_kwargs is missing")
