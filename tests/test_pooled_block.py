"""The last block at the head's position only (modeling/pooled_block.py), and an instruction model's LM
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
    fourth ends on it (a decoder's head then reads the token before: the rightmost one that is not the pad id)."""
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


@pytest.mark.parametrize("name", ["tiny-qwen2", "minilm"])
def test_training_model_pools_and_matches_the_whole_block(name):
    base = resolve_base_model(name)
    tokenizer = load_tokenizer(base.path)
    torch.manual_seed(0)
    pooled = regression_model(base, tokenizer)
    with torch.no_grad():  # a trained adapter: LoRA's B starts at zero, which would hide the adapter's path
        for param_name, p in pooled.named_parameters():
            if "lora_B" in param_name:
                p.normal_(0, 0.05)
    whole = unpooled(pooled)
    assert not any(hasattr(m, POSITIONS) for m in whole.modules())
    ids, mask = batch(tokenizer)
    seen = []
    layer_name, layer = next((n, m) for n, m in pooled.named_modules() if hasattr(m, POSITIONS))
    feed_forward = layer.mlp if hasattr(layer, "mlp") else layer.intermediate  # a decoder's, BERT's
    feed_forward.register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    pooled.eval(), whole.eval()  # no dropout: the two paths draw their masks on differently shaped tensors
    got = pooled(input_ids=ids, attention_mask=mask).logits
    want = whole(input_ids=ids, attention_mask=mask).logits
    assert seen == [len(ids) * pooled.config.hidden_size]  # the last feed-forward ran on one row per article
    np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), atol=1e-5)

    got.square().sum().backward()
    want.square().sum().backward()
    grads = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    checked = 0
    for param_name, p in pooled.named_parameters():
        if p.requires_grad:
            np.testing.assert_allclose(p.grad.numpy(), grads[param_name].numpy(), atol=1e-5, err_msg=param_name)
            checked += param_name.startswith(layer_name + ".")
    assert checked >= 12  # the last block's adapters learn through the pooled path too


def test_what_pooling_leaves_alone(tiny):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    base, tokenizer = tiny
    model = regression_model(base, tokenizer)
    assert not pool_last_block(model)  # already pooled
    twin = copy.deepcopy(model)  # a copy pools its own rows, not the original's
    assert last_layer(twin).forward.__self__ is last_layer(twin)
    assert getattr(last_layer(twin), POSITIONS) is not getattr(last_layer(model), POSITIONS)
    small = dict(vocab_size=64, num_labels=8, pad_token_id=0)
    assert not pool_last_block(GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, **small)))
    # Embeddings in place of ids: the head's position is unknown to the hook, so the block runs whole.
    ids, mask = batch(tokenizer)
    model.eval()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids[:1, :5])
        by_embeds = model(inputs_embeds=embeds, attention_mask=mask[:1, :5]).logits
        by_ids = model(input_ids=ids[:1, :5], attention_mask=mask[:1, :5]).logits
    np.testing.assert_allclose(by_embeds.numpy(), by_ids.numpy(), atol=1e-5)


DECODERS = {  # each a random 2-layer decoder: GQA, a window shorter than the rows, Qwen2's per-layer window
    "llama": dict(num_key_value_heads=1),
    "mistral-window": dict(sliding_window=4),
    "qwen2-window": dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
}


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_decoder_families_match_the_whole_block(kind, padding):
    import transformers

    family = kind.split("-")[0]
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
    shape = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, num_labels=8, pad_token_id=0, use_cache=False)
    config = getattr(transformers, f"{names[family]}Config")(**{**shape, **DECODERS[kind]})
    torch.manual_seed(0)
    whole = getattr(transformers, f"{names[family]}ForSequenceClassification")(config).eval()
    pooled = copy.deepcopy(whole)
    assert pool_last_block(pooled)
    lengths = (5, 11, 8)
    ids = torch.zeros((3, 11), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(0, n) if padding == "right" else slice(11 - n, 11)
        ids[row, span] = torch.randint(1, 64, (n,))
        mask[row, span] = 1
    with torch.no_grad():
        got = pooled(input_ids=ids, attention_mask=mask).logits
        want = whole(input_ids=ids, attention_mask=mask).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)


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


def test_bf16_keeps_the_rotary_frequencies_in_fp32(tiny):
    """Cast whole, the rotary frequencies round to bf16 and every angle drifts with the position (the ONNX graphs
    keep them in fp32, so PyTorch bf16 as their reference differed by it): in_bf16 casts the rest."""
    from types import SimpleNamespace

    from investment_risk.modeling.loading import in_bf16
    from investment_risk.modeling.onnx_runtime import load_cuda_libraries

    base, tokenizer = tiny
    model = regression_model(base, tokenizer).eval()
    frequencies = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
    assert frequencies and any(not torch.equal(b.to(torch.bfloat16).float(), b) for b in frequencies.values())
    kept = in_bf16(copy.deepcopy(model), "cpu")
    assert all(p.dtype == torch.bfloat16 for p in kept.parameters())
    buffers = dict(kept.named_buffers())
    assert all(torch.equal(buffers[n], b) and buffers[n].dtype == torch.float32 for n, b in frequencies.items())
    ids, mask = batch(tokenizer)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = kept(input_ids=ids, attention_mask=mask).logits.float()
    assert torch.allclose(got, want, atol=0.05)
    # The CUDA libraries' loader is a best effort: it asks ONNX Runtime to preload them, and a failure is not fatal.
    calls = []

    def preload():
        calls.append("preload")
        raise OSError("no CUDA here")

    load_cuda_libraries(SimpleNamespace(preload_dlls=preload))
    assert calls == ["preload"]
