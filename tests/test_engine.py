"""The schedule, the optimiser's groups and gradient clipping, against values worked out by hand."""

import copy

import pytest
import torch

from clip import CLIPModel, clip_loss
from conftest import tiny_config
from distributed import Dist
from engine import lr_factor, make_optimizer, param_groups, train_step


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



@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_gradient_clipping_gives_the_update_of_gradients_clipped_by_hand(fused):
    """Adam's first step moves a weight by lr * g / (|g| + eps). The clip is so tight here that the clipped
    gradients sit below eps, where that step grows with g; unclipped, nearly every weight would move by the whole lr.
    fused: the optimiser CUDA gets (built here on the CPU), which takes the clip as its kernel's grad_scale input."""
    lr = 1e-2
    cfg = tiny_config(grad_clip=1e-4, lr_image=lr, lr_text=lr, lr_head=lr)
    torch.manual_seed(0)
    model = CLIPModel(cfg, 500)
    reference = copy.deepcopy(model)
    before = copy.deepcopy(model)
    optimizer = (torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98), eps=1e-6, fused=True) if fused
                 else make_optimizer(model, cfg, torch.device("cpu")))
    images, ids = torch.randn(6, 3, 32, 32), torch.randint(5, 500, (6, 16))
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(1)  # the same dropout in both forward passes
    train_step(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), images, text, cfg, Dist(),
               torch.device("cpu"), torch.float32, lr_scale=1.0)
    assert not hasattr(optimizer, "grad_scale")  # the clip held for that step only

    torch.manual_seed(1)
    clip_loss(*reference(images, ids, text["attention_mask"])).backward()
    grads = [p.grad for p in reference.parameters() if p.grad is not None]
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads)).item()
    assert norm > 100 * cfg.grad_clip  # the clip is at work
    for g in grads:
        g.mul_(cfg.grad_clip / (norm + 1e-6))
    torch.optim.AdamW(param_groups(reference, cfg), betas=(0.9, 0.98), eps=1e-6, foreach=False).step()
    steps = []
    for (name, p), q, p0 in zip(model.named_parameters(), reference.parameters(), before.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=lr * 1e-3, msg=name)
        steps.append((q - p0).abs().flatten())
    assert torch.cat(steps).median() < lr / 10  # the clipped step: far from the lr an unclipped one takes


@pytest.mark.parametrize("max_norm, scale", [(1.0, 5.0), (10.0, 1.0)], ids=["above the limit", "below it"])
def test_fused_clipping_hands_adamw_the_scale_of_gradients_above_the_limit_and_no_other(max_norm, scale):
    """A gradient of norm 5: clipped to 1, fused AdamW divides it by 5 (and the gradient itself stays as it is);
    under a limit of 10 it is left alone, by either path."""
    from engine import clip_gradients

    for fused in [True, False]:
        layer = torch.nn.Linear(2, 2, bias=False)
        layer.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
        optimizer = torch.optim.AdamW(layer.parameters(), fused=fused, foreach=None if fused else True)
        clip_gradients(layer, optimizer, torch.amp.GradScaler("cpu", enabled=False), max_norm)
        if fused:
            assert optimizer.grad_scale.dtype == torch.float32
            torch.testing.assert_close(optimizer.grad_scale, torch.tensor(scale), rtol=1e-6, atol=0)
            torch.testing.assert_close(layer.weight.grad, torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        else:
            assert not hasattr(optimizer, "grad_scale")
            torch.testing.assert_close(layer.weight.grad, torch.tensor([[3.0, 0.0], [0.0, 4.0]]) / scale)


def _compiled_max_pool_gradient(x: torch.Tensor, weight: torch.Tensor, compile_) -> tuple[torch.Tensor, set]:
    """The gradient of sum(max_pool(relu(x)) * weight) with respect to x, through the given compile function,
    and the ops of the graphs inductor built."""
    ops = set()

    def spy(graph):
        ops.update(str(node.target) for node in graph.nodes if node.op == "call_function")

    def f(x):
        return (torch.nn.functional.max_pool2d(torch.relu(x), 3, 2, 1) * weight).sum()

    x = x.detach().clone().requires_grad_()
    try:
        with torch._inductor.config.patch(post_grad_custom_post_pass=spy):
            compile_(f)(x).backward()
    finally:
        torch._dynamo.reset()
    return x.grad, ops


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (.ci/gpu-check runs it)"))])
def test_max_pool_backward_compiles_as_a_gather_and_gives_eager_gradients(device):
    """ResNet's stem pool (3x3, stride 2), channels_last, on inputs full of ties (small integers, and ReLU's zeros):
    each tie's gradient goes to the first maximum, as in eager PyTorch, to the last bit. With torch's decomposition
    the graph holds a scatter_add; lowered, inductor's own max-pool backward, and the setting is put back after."""
    from torch._inductor import decomposition

    from engine import MAX_POOL_BACKWARD, compile_model, lower_max_pool_backward

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # as under autocast on CUDA
    # small integers: every gradient, a sum of at most four weights, is exact in any order and in bfloat16
    x = torch.randint(-2, 4, (4, 8, 17, 16), device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = torch.randint(-3, 4, (4, 8, 9, 8), device=device).to(dtype)
    x_eager = x.clone().requires_grad_()
    (torch.nn.functional.max_pool2d(torch.relu(x_eager), 3, 2, 1) * weight).sum().backward()
    decomposed = MAX_POOL_BACKWARD in decomposition.decompositions  # torch 2.10 and later: a scatter_add
    if device == "cpu":
        before = lower_max_pool_backward(True)
        try:
            lowered, ops = _compiled_max_pool_gradient(x, weight, torch.compile)
        finally:
            assert lower_max_pool_backward(before)  # the setting in force was the lowered one
        assert (MAX_POOL_BACKWARD in decomposition.decompositions) == decomposed  # put back
        if decomposed:
            scattered, scatter_ops = _compiled_max_pool_gradient(x, weight, torch.compile)
            assert "aten.scatter_add.default" in scatter_ops  # the spy sees what it looks for
            torch.testing.assert_close(scattered, x_eager.grad, rtol=0, atol=0)
    else:  # compile_model on CUDA lowers it for the rest of the process, as train.py and bench.py do
        lowered, ops = _compiled_max_pool_gradient(x, weight, lambda f: compile_model(f, "default", x.device))
    assert "aten.max_pool2d_with_indices_backward.default" in ops
    assert not any("scatter" in op for op in ops), ops
    torch.testing.assert_close(lowered, x_eager.grad, rtol=0, atol=0)


def test_compiling_for_cuda_sets_inductors_tuned_settings_and_for_the_cpu_leaves_them():
    """torch.compile is lazy: nothing here needs a GPU. The settings hold for every later compile in the process."""
    from torch._inductor import config, decomposition

    from engine import CUDA_INDUCTOR, MAX_POOL_BACKWARD, compile_model, lower_max_pool_backward

    before = lower_max_pool_backward(False)
    decomposed = MAX_POOL_BACKWARD in decomposition.decompositions  # as this torch has it
    try:
        with config.patch({key: getattr(config, key) for key in CUDA_INDUCTOR}):  # puts them back afterwards
            defaults = {key: getattr(config, key) for key in CUDA_INDUCTOR}
            assert defaults != CUDA_INDUCTOR  # otherwise this test shows nothing
            compile_model(torch.nn.Linear(2, 2), "default", torch.device("cpu"))
            assert {key: getattr(config, key) for key in CUDA_INDUCTOR} == defaults
            assert (MAX_POOL_BACKWARD in decomposition.decompositions) == decomposed
            compile_model(torch.nn.Linear(2, 2), "default", torch.device("cuda"))
            assert {key: getattr(config, key) for key in CUDA_INDUCTOR} == CUDA_INDUCTOR
            assert MAX_POOL_BACKWARD not in decomposition.decompositions
        assert {key: getattr(config, key) for key in CUDA_INDUCTOR} == defaults
    finally:
        lower_max_pool_backward(before)


def test_a_step_takes_the_schedules_rate_and_leaves_no_gradient_behind():
    """Adam's first step moves a weight by about lr * sign(g): at a quarter of the rate, a quarter of lr."""
    lr = 1e-2
    cfg = tiny_config(grad_clip=0.0, lr_image=lr, lr_text=lr, lr_head=lr, weight_decay=0.0)
    torch.manual_seed(0)
    model = CLIPModel(cfg, 500)
    before = copy.deepcopy(model)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    images, ids = torch.randn(6, 3, 32, 32), torch.randint(5, 500, (6, 16))
    train_step(model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), images,
               {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cfg, Dist(), torch.device("cpu"),
               torch.float32, lr_scale=0.25)
    assert all(g["lr"] == 0.25 * g["base_lr"] for g in optimizer.param_groups)
    moved = torch.cat([(p - p0).detach().abs().flatten() for p, p0 in zip(model.parameters(), before.parameters())])
    assert moved.max() <= 0.25 * lr * 1.001 and moved[moved > 0].median().item() == pytest.approx(0.25 * lr, rel=0.05)
    assert all(p.grad is None for p in model.parameters())  # the next step starts from zero


def test_clipping_under_the_fp16_grad_scaler_clips_the_unscaled_gradients():
    """The scaler multiplies the loss by 2**10 (exact in fp32): the step must be the one without it."""
    cfg = tiny_config(grad_clip=1e-3)
    images, ids = torch.randn(6, 3, 32, 32), torch.randint(5, 500, (6, 16))
    text = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    models = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = CLIPModel(cfg, 500)
        optimizer = make_optimizer(model, cfg, torch.device("cpu"))
        torch.manual_seed(1)
        train_step(model, model, optimizer, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=enabled),
                   images, text, cfg, Dist(), torch.device("cpu"), torch.float32, lr_scale=1.0)
        models.append(model)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7, msg=name)
