"""The schedule and the optimiser's groups, against values worked out by hand."""

import pytest

from clip import CLIPModel
from conftest import tiny_config
from engine import lr_factor, param_groups


@pytest.mark.parametrize("step, min_frac, expected", [
    (0, 0.0, 0.25),  # warmup over 4 steps: a quarter of the rate at the first step...
    (3, 0.0, 1.0),  # ...the whole rate at its last
    (4, 0.0, 1.0),  # the cosine starts at the top
    (7, 0.0, 0.5),  # halfway through the 6 decay steps
    (10, 0.0, 0.0),
    (7, 0.1, 0.55),  # the floor raises the curve: 0.1 + 0.9 * 0.5
    (10, 0.1, 0.1),
    (12, 0.1, 0.1),  # past the end it stays at the floor
])
def test_warmup_then_cosine_by_hand(step, min_frac, expected):
    assert lr_factor(step, 10, 4, min_frac) == pytest.approx(expected)


def test_every_trainable_weight_is_in_one_group_at_its_towers_rate_and_only_matrices_decay():
    cfg = tiny_config(lr_image=1e-4, lr_text=2e-5, lr_head=3e-3, weight_decay=0.05)
    model = CLIPModel(cfg, 500)
    groups = param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each once
    rates = {"image_encoder": 1e-4, "text_encoder": 2e-5, "image_projection": 3e-3, "text_projection": 3e-3,
             "logit_scale": 3e-3}
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            assert g["lr"] == g["base_lr"] == rates[name.split(".")[0]], name
            decays = p.ndim >= 2  # not norm scales, biases or the temperature
            assert g["weight_decay"] == (0.05 if decays else 0.0), name
