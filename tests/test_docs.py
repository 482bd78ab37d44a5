"""The worked example of docs/architecture.md ("Adding a rule") runs as written."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from localssl.builder import build_optimizer
from localssl.config import ConfigError, TrainConfig
from localssl.engine.step import PlainStep
from localssl.engine.trainer import train
from localssl.models import build_encoder
from localssl.rules import RULES, build_rule

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


@pytest.fixture
def example_rule():
    text = DOC.read_text()
    section = text[text.index("#### Adding a rule"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, f"{DOC}:adding-a-rule", "exec"), {})
    yield "block-mse"
    RULES._items.pop("block-mse")  # the registry is global: leave it as the other tests found it


def test_the_worked_example_registers_trains_and_checks_its_options(example_rule, tmp_path):
    enc = build_encoder("vgg6", 1 / 16)
    rule = build_rule(example_rule, enc.feature_shapes((3, 32, 32)), {"dim": 8})
    opt = build_optimizer(enc, rule, lr=1e-3, weight_decay=0.0)
    losses = PlainStep()(enc, rule, opt, torch.randn(8, 3, 32, 32))
    assert len(losses) == len(enc) and all(torch.isfinite(v) for v in losses)
    with pytest.raises(ConfigError, match="dim must be >= 1"):
        build_rule(example_rule, enc.feature_shapes((3, 32, 32)), {"dim": 0})
    train(TrainConfig(rule=example_rule, dataset="shapes10", width=1 / 16, subset=32, batch_size=8, max_steps=2,
                      amp="off", progress=False, out=str(tmp_path / "r"), rule_options={"dim": 4}))
    assert "dim: 4" in (tmp_path / "r" / "config.yaml").read_text()
