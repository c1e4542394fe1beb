"""Hugging Face causal LMs with DFA (dfa_kernels.huggingface): tiny GPT-2 and Llama models built
from configs (nothing downloaded), every placement and error position."""

import warnings

import pytest
import torch

import dfa_kernels as dk
from dfa_kernels import huggingface as dkh
from dfa_kernels.convert import HybridGradientWarning

transformers = pytest.importorskip("transformers", reason='needs the hf extra: pip install "dfa-kernels[hf]"')
transformers.logging.set_verbosity_error()

VOCAB = 61
CASES = [(p, e) for p in dkh.PLACEMENTS for e in dkh.ERROR_AT]


def tiny_gpt2():
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def tiny_llama():
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(scope="module", autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().eval()  # eval: no dropout anywhere, generate() as usual


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (3, 12), generator=g)


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def test_layout_is_read_from_the_modules():
    gpt2 = dkh.find_layout(tiny_gpt2())
    assert (gpt2.blocks, gpt2.count, gpt2.final_norm, gpt2.head, gpt2.attention, gpt2.mlp_down) == (
        "transformer.h",
        2,
        "transformer.ln_f",
        "lm_head",
        "attn",
        "mlp.c_proj",
    )
    assert gpt2.linears == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # transformers' Conv1D
    llama = dkh.find_layout(tiny_llama())
    assert (llama.blocks, llama.final_norm, llama.attention, llama.mlp_down) == (
        "model.layers",
        "model.norm",
        "self_attn",
        "mlp.down_proj",
    )
    assert set(llama.linears) == (
        {f"self_attn.{n}_proj" for n in "qkvo"} | {f"mlp.{n}_proj" for n in ("gate", "up", "down")}
    )
    assert llama.norms == ("input_layernorm", "post_attention_layernorm")


@pytest.mark.parametrize("placement, error_at", CASES)
def test_outputs_equal_the_original(model, placement, error_at):
    ids = _batch()
    converted = dkh.convert(model, placement, error_at, seed=1)
    with torch.no_grad():
        ref = model(ids, labels=ids)
        torch.testing.assert_close(converted(ids).logits, ref.logits)
        out = converted(ids, labels=ids)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
    if error_at == "logits":
        assert out.logits is None  # the fused head never builds them
    expected = {"macro": 2, "micro": 1 + 3 * 2, "linear": 1 + 2 * (len(dkh.find_layout(model).linears) + 2)}
    converted(ids, labels=ids).loss.backward()
    assert len(converted.dfa.spec.widths) == expected[placement]


@pytest.mark.parametrize("placement, error_at", CASES)
def test_bp_mode_gradients_equal_the_original(model, placement, error_at):
    ids = _batch()
    converted = dkh.convert(model, placement, error_at, mode="bp")
    model(ids, labels=ids).loss.backward()
    converted(ids, labels=ids).loss.backward()
    ref = _grads(model)
    for name, grad in _grads(converted.model).items():
        torch.testing.assert_close(grad, ref[name], atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("placement, error_at", CASES)
def test_dfa_gradients_differ_from_bp_and_reach_every_parameter(model, placement, error_at):
    ids = _batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", HybridGradientWarning)  # every placement is faithful: no leak
        converted = dkh.convert(model, placement, error_at, seed=2)
        converted(ids, labels=ids).loss.backward()
    model(ids, labels=ids).loss.backward()
    grads, ref = _grads(converted.model), _grads(model)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    head = "lm_head.weight" if "lm_head.weight" in grads else None
    layout = dkh.find_layout(model)
    first_block = f"{layout.blocks}.0."
    differing = [n for n in grads if n.startswith(first_block) and not torch.allclose(grads[n], ref[n], atol=1e-6)]
    assert differing  # the first block learns from feedback, not from backprop
    if error_at == "hidden" and head and not model.config.tie_word_embeddings:
        torch.testing.assert_close(grads[head], ref[head])  # after the DFA output: the exact gradient


def test_linear_placement_computes_no_linear_input_gradient(model):
    """No linear layer of a block receives an input that requires grad: no input-gradient GEMM and
    no attention backward run below the head."""
    converted = dkh.convert(model, "linear", "hidden")
    layout = converted.layout
    seen = []
    for name, module in converted.model.named_modules():
        if name.startswith(layout.blocks + ".") and dkh._is_linear(module):
            module.register_forward_pre_hook(lambda m, args: seen.append(args[0].requires_grad))
    ids = _batch()
    converted(ids, labels=ids).loss.backward()
    assert len(seen) == 2 * len(layout.linears) and not any(seen)


@pytest.mark.parametrize("placement", dkh.PLACEMENTS)
def test_a_dfa_step_lowers_the_loss_on_a_repeated_batch(model, placement):
    ids = _batch()
    converted = dkh.convert(model, placement, "logits" if placement == "micro" else "hidden", seed=3).train()
    opt = torch.optim.Adam(converted.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = converted(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses


@pytest.mark.parametrize("placement, error_at", [("micro", "logits"), ("linear", "hidden")])
def test_save_pretrained_from_pretrained_round_trip(model, placement, error_at, tmp_path):
    ids = _batch()
    converted = dkh.convert(model, placement, error_at, seed=5, distribution="rademacher", scale=0.5)
    converted(ids, labels=ids).loss.backward()
    converted.save_pretrained(tmp_path)
    loaded = dkh.DFAForCausalLM.from_pretrained(tmp_path)
    assert (loaded.placement, loaded.error_at, loaded.points) == (placement, error_at, converted.points)
    assert loaded.dfa.spec == converted.dfa.spec and loaded.dfa.scale == 0.5  # the spec survives
    for (name, p), q in zip(converted.model.state_dict().items(), loaded.model.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    for a, b in zip(loaded.dfa.feedback_matrices(), converted.dfa.feedback_matrices()):
        assert torch.equal(a, b)
    converted.zero_grad()
    converted(ids, labels=ids).loss.backward()
    loaded(ids, labels=ids).loss.backward()
    for name, grad in _grads(converted.model).items():
        torch.testing.assert_close(_grads(loaded.model)[name], grad, msg=name)
    # transformers alone loads the trained weights, without DFA
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            plain(ids).logits, converted(ids).logits if error_at == "hidden" else converted.model(ids).logits
        )


def test_from_pretrained_converts_a_plain_checkpoint(model, tmp_path):
    model.save_pretrained(tmp_path)
    converted = dkh.DFAForCausalLM.from_pretrained(tmp_path, placement="micro", seed=9)
    assert converted.placement == "micro" and converted.dfa.seed == 9 and converted.dfa.spec is None
    ids = _batch()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, model(ids).logits)


@pytest.mark.parametrize("placement, error_at", [("macro", "hidden"), ("micro", "logits"), ("linear", "logits")])
def test_generate_works_and_matches_the_original(model, placement, error_at):
    ids = _batch()[:2, :4]
    converted = dkh.convert(model, placement, error_at)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = converted.generate(ids, **kwargs)
    assert out.shape == (2, 9)
    torch.testing.assert_close(out, model.generate(ids, **kwargs))
    assert not converted.dfa.pending_points
    converted(ids, labels=ids).loss.backward()  # training after generation: no stale point mixed in


def test_attributes_reach_the_transformers_model(model):
    converted = dkh.convert(model)
    assert converted.config is converted.model.config
    assert converted.get_output_embeddings() is converted.model.lm_head
    with pytest.raises(AttributeError):
        _ = converted.no_such_attribute


def test_tied_embeddings_stay_tied():
    converted = dkh.convert(tiny_gpt2(), "macro", "logits")
    assert converted.model.lm_head.weight is converted.model.transformer.wte.weight


def test_plain_convert_on_gpt2_warns_about_the_residual_stream():
    gpt2, ids = tiny_gpt2(), _batch()
    converted = dk.convert(gpt2)  # after every NewGELUActivation: inside the residual branches
    assert converted.points == ("transformer.h.0.mlp.act", "transformer.h.1.mlp.act")
    with pytest.warns(HybridGradientWarning, match="transformer.wte, transformer.wpe"):
        out = converted(ids)
    assert out.logits.shape == (3, 12, VOCAB)
    with pytest.raises(RuntimeError, match="computed output\\['loss'\\] inside its forward"):
        converted(ids, labels=ids)
    at_norm = dk.convert(gpt2, points="transformer.h.*", output_module="transformer.ln_f")
    with warnings.catch_warnings():
        warnings.simplefilter("error", HybridGradientWarning)
        at_norm(ids, labels=ids).loss.backward()


def test_gradient_checkpointing_is_refused():
    gpt2 = tiny_gpt2()
    # transformers 5 renamed it (the old name warns); 4.x has only the old one
    getattr(gpt2, "activation_checkpointing_enable", gpt2.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing is on"):
        dkh.convert(gpt2)


def test_fdfa_is_refused_with_its_reason():
    for convert in (dkh.convert, dk.convert):
        with pytest.raises(ValueError, match="mode 'fdfa' runs the forward in forward-mode AD"):
            convert(tiny_gpt2(), mode="fdfa")
