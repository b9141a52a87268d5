"""The decoder's last block at the head's position only (modeling/pooled_block.py), and an instruction model's LM
head at the positions it learns from: the same scores, losses and gradients for less work."""

import copy

import numpy as np
import pytest
import torch

from investment_risk.modeling.networks import InstructionModel, causal_lm, regression_model
from investment_risk.modeling.pooled_block import POSITIONS, pool_last_block
from investment_risk.modeling.presets import load_tokenizer, resolve_base_model
from investment_risk.modeling.tokens import pad_batch


@pytest.fixture(scope="module")
def tiny():
    base = resolve_base_model("tiny-qwen2")
    return base, load_tokenizer(base.path)


def batch(tokenizer, lengths=(5, 17, 9, 17, 3), pad_in_text=True):
    """Right-padded rows of mixed lengths; with `pad_in_text` the second has the pad id inside its text and the
    fourth ends on it (the head then reads the token before: the rightmost one that is not the pad id)."""
    rng = np.random.default_rng(0)
    rows = [rng.integers(10, 200, size=n) for n in lengths]
    if pad_in_text:
        rows[1][7] = tokenizer.pad_token_id
        rows[3][-1] = tokenizer.pad_token_id
    ids, mask = pad_batch(rows, tokenizer.pad_token_id)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def unpooled(model):
    """The same model with every block whole: a copy whose last block has its class's forward back."""
    twin = copy.deepcopy(model)
    for layer in [m for m in twin.modules() if hasattr(m, POSITIONS)]:
        del layer.forward
        delattr(layer, POSITIONS)
    return twin


def last_layer(model):
    return [m for m in model.modules() if hasattr(m, POSITIONS)][-1]


def test_training_model_pools_and_matches_the_whole_block(tiny):
    base, tokenizer = tiny
    torch.manual_seed(0)
    pooled = regression_model(base, tokenizer)
    with torch.no_grad():  # a trained adapter: LoRA's B starts at zero, which would hide the adapter's path
        for name, p in pooled.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    whole = unpooled(pooled)
    assert not any(hasattr(m, POSITIONS) for m in whole.modules())
    ids, mask = batch(tokenizer)
    seen = []
    last_layer(pooled).mlp.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    pooled.eval(), whole.eval()  # no dropout: the two paths draw their masks on differently shaped tensors
    got = pooled(input_ids=ids, attention_mask=mask).logits
    want = whole(input_ids=ids, attention_mask=mask).logits
    hidden = pooled.config.hidden_size
    assert seen == [(len(ids), hidden)]  # the last MLP ran on one row per article, not on every position
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), atol=1e-5)

    got.square().sum().backward()
    want.square().sum().backward()
    grads = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    last_index = pooled.config.num_hidden_layers - 1
    checked = 0
    for name, p in pooled.named_parameters():
        if p.requires_grad:
            np.testing.assert_allclose(p.grad.numpy(), grads[name].numpy(), atol=1e-5, err_msg=name)
            checked += f"layers.{last_index}." in name
    assert checked >= 14  # the last block's adapters learn through the pooled path too


def test_what_pooling_leaves_alone(tiny):
    base, tokenizer = tiny
    model = regression_model(base, tokenizer)
    assert not pool_last_block(model)  # already pooled
    twin = copy.deepcopy(model)  # a copy pools its own rows, not the original's
    assert last_layer(twin).forward.__self__ is last_layer(twin)
    assert getattr(last_layer(twin), POSITIONS) is not getattr(last_layer(model), POSITIONS)
    minilm = resolve_base_model("minilm")
    assert not pool_last_block(regression_model(minilm, load_tokenizer(minilm.path), meta=True))  # BERT: not known
    # Embeddings in place of ids: the head's position is unknown to the hook, so the block runs whole.
    ids, mask = batch(tokenizer)
    model.eval()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[:1, :5])
        by_embeds = model(inputs_embeds=embeds, attention_mask=mask[:1, :5]).logits
        by_ids = model(input_ids=ids[:1, :5], attention_mask=mask[:1, :5]).logits
    np.testing.assert_allclose(by_embeds.numpy(), by_ids.numpy(), atol=1e-5)


def test_compiled_blocks_leave_the_pooled_one_eager(tiny):
    from investment_risk.training.recipe import compile_blocks

    base, tokenizer = tiny
    model = regression_model(base, tokenizer).eval()
    whole = unpooled(model)
    compile_blocks(model)
    blocks = [m for m in model.modules() if type(m).__name__ == "Qwen2DecoderLayer"]
    assert [m._compiled_call_impl is not None for m in blocks] == [True] * (len(blocks) - 1) + [False]
    ids, mask = batch(tokenizer)
    got = model(input_ids=ids, attention_mask=mask).logits  # compiled blocks feeding the eager pooled one
    want = whole(input_ids=ids, attention_mask=mask).logits
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), atol=1e-4)


PROMPT_LENGTHS = np.array([7, 10, 5])


@pytest.fixture(scope="module")
def instruction(tiny):
    """An instruction model (LoRA at init, a fresh head) and a batch of three rows with their prompt lengths."""
    base, tokenizer = tiny
    torch.manual_seed(0)
    lm, config = causal_lm(base)
    ids, mask = batch(tokenizer, lengths=(12, 17, 9), pad_in_text=False)
    return InstructionModel(lm, config.hidden_size).eval(), ids, mask


def test_instruction_logits_only_where_targets_are(instruction):
    model, ids, mask = instruction
    prompt_end = torch.from_numpy(PROMPT_LENGTHS - 1)
    first = int(prompt_end.min())
    projected = []
    hook = model.lm.get_output_embeddings().register_forward_hook(
        lambda module, args, out: projected.append(args[0].shape[1]))
    with torch.no_grad():
        all_logits, scores = model(ids, mask, prompt_end)
        kept, kept_scores = model(ids, mask, prompt_end, first)
        only_scores = model.score(ids, mask)
        want = model(ids, mask, mask.sum(dim=1) - 1)[1]
    hook.remove()
    width = ids.shape[1]
    assert projected == [width, width - first, 1, width]
    np.testing.assert_allclose(kept.numpy(), all_logits[:, first:].numpy(), atol=1e-5)
    np.testing.assert_allclose(kept_scores.numpy(), scores.numpy(), atol=1e-6)
    np.testing.assert_allclose(only_scores.numpy(), want.numpy(), atol=1e-6)


def test_instruction_token_loss_is_the_loss_over_every_logit(instruction, tiny):
    from types import SimpleNamespace

    from investment_risk.training.instruction import InstructionTask

    model, ids, mask = instruction
    data = SimpleNamespace(tokens=[r[m == 1].numpy() for r, m in zip(ids, mask)], prompt_lengths=PROMPT_LENGTHS)
    with torch.no_grad():
        token_loss, _ = InstructionTask(SimpleNamespace(), tiny[1])._losses(model, data, np.arange(3),
                                                                              torch.device("cpu"), None)
        logits, _ = model(ids, mask, torch.from_numpy(PROMPT_LENGTHS - 1))
    targets = torch.where(mask == 1, ids, -100)
    targets[torch.arange(ids.shape[1])[None, :] < torch.from_numpy(PROMPT_LENGTHS)[:, None]] = -100
    want = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets[:, 1:], ignore_index=-100)
    assert float(token_loss) == pytest.approx(float(want), abs=1e-5)


def test_torch_scoring_pools_and_export_does_not(exported):
    from investment_risk.modeling.description import describe_model
    from investment_risk.modeling.loading import load_runner, scoring_module

    run, model_dir, _ = exported
    runner = load_runner(describe_model(model_dir), "torch", "cpu")
    assert any(hasattr(m, POSITIONS) for m in runner.forward.modules())  # score --backend torch
    module, _, _ = scoring_module(run)  # what export traces: the graph pass pools the graph instead
    assert not any(hasattr(m, POSITIONS) for m in module.modules())
