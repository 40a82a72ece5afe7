"""flce.integrations.transformers against the unpatched transformers models.

Every family is a tiny randomly initialised model built from its config (no downloads). The
unpatched copy of the same model, whose loss transformers computes from materialized float32
logits, is the reference: the patched model's loss and the gradient of every parameter must match
it. The head weights are scaled so that logits have a standard deviation of a few units (a trained
LM's regime; softcapping then really bends them).
"""

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from flce.integrations.transformers import (
    SUPPORTED_MODEL_TYPES,
    DeferredLogits,
    is_patched,
    patch,
    unpatch,
)

VOCAB = 1037  # > 1000, not a multiple of 64
HIDDEN = 64
BATCH, SEQ = 2, 13

COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "max_position_embeddings": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
          "tie_word_embeddings": False}

# model type -> (config class, model class, config overrides). The overrides switch on what the
# family does after lm_head: Gemma2/3 softcap, Cohere and Granite scale, Mixtral adds a router loss.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2, "output_router_logits": True,
                 "router_aux_loss_coef": 0.05, "sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               {"head_dim": 16, "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    {"head_dim": 16, "final_logit_softcapping": 3.0, "query_pre_attn_scalar": 16,
                     "sliding_window": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.5}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 0.4}),
}


@pytest.fixture
def dev(request):
    """The device of conftest's `device` fixture (--device), cpu without one."""
    try:
        return torch.device(request.getfixturevalue("device"))
    except pytest.FixtureLookupError:
        return torch.device("cpu")


def build(family, device, seed=0, **overrides):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).to(device)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head.normal_(0.0, 2.5 / math.sqrt(HIDDEN))
    return model.train()


def batch(device, seed=1, ignored=0.25):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    labels = ids.clone()
    labels[torch.rand(BATCH, SEQ, generator=g) < ignored] = -100
    labels[:, :2] = -100  # a prompt
    return ids.to(device), labels.to(device)


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


# float32 on CUDA may run its matmuls in TF32 (in flce or in the model): looser there.
GRAD_RTOL = {"cpu": 2e-4, "cuda": 3e-3}
LOSS_RTOL = {"cpu": 2e-5, "cuda": 1e-3}


def assert_close_grads(got, want, rtol=None):
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).norm().item()
        scale = want[name].norm().item()
        rtol = rtol or GRAD_RTOL[want[name].device.type]
        assert err <= rtol * scale + 1e-7, f"{name}: |g - g_ref| = {err:.3e}, |g_ref| = {scale:.3e}"


def run(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out


def assert_loss_close(got, want, rtol=None):
    rtol = max(rtol or 0.0, LOSS_RTOL[got.device.type])
    assert torch.isfinite(got)
    assert abs(got.item() - want.item()) <= rtol * abs(want.item()) + 1e-6, (got.item(), want.item())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_loss_and_grads(family, dev):
    ref = build(family, dev)
    model = patch(copy.deepcopy(ref))
    ids, labels = batch(dev)
    want = run(ref, ids, labels)
    got = run(model, ids, labels)
    assert want.logits is not None and got.logits is None
    assert_loss_close(got.loss, want.loss)
    assert_close_grads(grads(model), grads(ref))
    if family == "mixtral":
        assert got.aux_loss is not None and torch.allclose(got.aux_loss, want.aux_loss)

    # Gradient accumulation: sum over the micro-batch divided by the count over all micro-batches.
    items = torch.tensor(37, device=dev)
    want = run(ref, ids, labels, num_items_in_batch=items)
    got = run(model, ids, labels, num_items_in_batch=items)
    assert_loss_close(got.loss, want.loss)
    assert_close_grads(grads(model), grads(ref))


def test_gemma3_multimodal_text_only(dev):
    """Gemma3ForConditionalGeneration (model type gemma3): its lm_head sits beside a vision tower."""
    _, _, extra = FAMILIES["gemma3_text"]
    text = {**COMMON, **extra}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 28, "patch_size": 14}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                       mm_tokens_per_image=4, image_token_index=VOCAB - 3,
                                       boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 1)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(config).to(dev).train()
    with torch.no_grad():
        ref.get_output_embeddings().weight.normal_(0.0, 2.5 / math.sqrt(HIDDEN))
    model = patch(copy.deepcopy(ref))
    ids, labels = batch(dev)
    ids = ids.clamp(max=VOCAB - 4)  # no image tokens
    labels = torch.where(labels == -100, labels, ids)
    want = run(ref, ids, labels)
    got = run(model, ids, labels)
    assert got.logits is None
    assert_loss_close(got.loss, want.loss)
    assert_close_grads(grads(model), grads(ref))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_without_labels_and_in_eval_unchanged(family, dev):
    ref = build(family, dev)
    model = patch(copy.deepcopy(ref))
    ids, labels = batch(dev)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = model(input_ids=ids).logits
        assert torch.equal(got, want)
        ref.eval()
        model.eval()
        want = ref(input_ids=ids, labels=labels)
        got = model(input_ids=ids, labels=labels)
    assert got.logits is not None and torch.equal(got.logits, want.logits)
    assert torch.equal(got.loss, want.loss)
    generated = model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, ref.generate(ids[:1, :5], max_new_tokens=3, do_sample=False))

    patch(model, fuse_in_eval=True)
    with torch.no_grad():
        fused = model(input_ids=ids, labels=labels)
    assert fused.logits is None
    assert_loss_close(fused.loss, want.loss)


@pytest.mark.parametrize("lora", [False, True])
def test_autocast_bf16(dev, lora):
    """Mixed precision as the Trainer runs it: float32 weights, bf16 autocast."""
    ref = build("llama", dev)
    if lora:
        peft = pytest.importorskip("peft")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head"])
        ref = peft.get_peft_model(ref, config)
        with torch.no_grad():
            for n, p in ref.named_parameters():
                if "lora_B" in n:
                    p.normal_(0.0, 0.5)
    model = patch(copy.deepcopy(ref))
    ids, labels = batch(dev)
    want = run(ref, ids, labels)  # float32 throughout: the reference
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        got = run(model, ids, labels)
    assert got.logits is None and got.loss.dtype == torch.float32
    assert_loss_close(got.loss, want.loss, rtol=2e-2)
    assert_close_grads(grads(model), grads(ref), rtol=6e-2)


def test_tuple_output_and_positional_labels(dev):
    ref = build("qwen3", dev)
    model = patch(copy.deepcopy(ref))
    ids, labels = batch(dev)
    want = ref(ids, None, None, None, None, labels, return_dict=False)
    got = model(ids, None, None, None, None, labels, return_dict=False)
    assert_loss_close(got[0], want[0])
    assert not any(isinstance(v, DeferredLogits) for v in got)
    assert len(got) == len(want) - 1  # the logits are left out


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_tied_embeddings(family, dev):
    ref = build(family, dev, tie_word_embeddings=True)
    assert ref.lm_head.weight is ref.model.embed_tokens.weight
    model = patch(copy.deepcopy(ref))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, labels = batch(dev)
    want = run(ref, ids, labels)
    got = run(model, ids, labels)
    assert_loss_close(got.loss, want.loss)
    assert_close_grads(grads(model), grads(ref))


def test_shift_labels_and_options(dev):
    ref = build("llama", dev)
    model = patch(copy.deepcopy(ref))
    ids, labels = batch(dev)
    # Pre-shifted labels (sequence parallelism, packed sequences) are taken as they are.
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    want = run(ref, ids, labels)
    got = model(input_ids=ids, labels=labels, shift_labels=shifted)
    assert_loss_close(got.loss, want.loss)

    # Loss options go to flce: label smoothing against torch's own.
    patch(model, label_smoothing=0.1)
    with torch.no_grad():
        logits = ref(input_ids=ids).logits.float()
        expect = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), label_smoothing=0.1)
        assert_loss_close(model(input_ids=ids, labels=labels).loss, expect)


def test_training_loop_matches(dev):
    ref = build("gemma2", dev)
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = patch(copy.deepcopy(ref))
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(5):
        ids, labels = batch(dev, seed=10 + step)
        want = run(ref, ids, labels)
        got = run(model, ids, labels)
        assert_loss_close(got.loss, want.loss, rtol=1e-4)
        opt_ref.step()
        opt.step()


def test_hf_trainer(dev, tmp_path):
    ids, labels = batch(dev, seed=3)
    rows = [{"input_ids": ids[i % BATCH].tolist(), "labels": labels[i % BATCH].tolist()}
            for i in range(8)]
    losses = {}
    finals = {}
    for name in ("ref", "flce"):
        model = build("llama", dev)
        if name == "flce":
            patch(model)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=2,
            gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[],
            save_strategy="no", use_cpu=dev.type == "cpu", dataloader_num_workers=0, seed=0,
            data_seed=0, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows,
                                       data_collator=transformers.default_data_collator)
        trainer.train()
        losses[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        finals[name] = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert len(losses["flce"]) == 2
    for got, want in zip(losses["flce"], losses["ref"]):
        assert abs(got - want) <= LOSS_RTOL[dev.type] * 5 * abs(want), (losses, dev)
    # Adam's update is scale-free, so this checks the gradients' direction; the logged losses
    # above check the num_items_in_batch scaling.
    atol = 1e-5 if dev.type == "cpu" else 1e-4
    for n, want in finals["ref"].items():
        assert torch.allclose(finals["flce"][n], want, rtol=1e-4, atol=atol), n


def _peft():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("order", ["patch_first", "peft_first"])
def test_peft_lora_on_lm_head(dev, order):
    peft = _peft()
    base = build("llama", dev)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                             target_modules=["q_proj", "v_proj", "lm_head"])
    ref = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # B starts at zero: make the adapter contribute
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    if order == "patch_first":
        model = peft.get_peft_model(patch(copy.deepcopy(base)), config)
        model.load_state_dict(ref.state_dict())
    else:
        model = patch(copy.deepcopy(ref))
    ids, labels = batch(dev)
    want = run(ref, ids, labels)
    got = run(model, ids, labels)
    assert got.logits is None
    assert_loss_close(got.loss, want.loss)
    g = grads(model)
    assert any("lm_head.lora_B" in n for n in g)
    assert_close_grads(g, grads(ref))
    with torch.no_grad(), model.disable_adapter(), ref.disable_adapter():
        assert_loss_close(model(input_ids=ids, labels=labels).loss,
                          ref(input_ids=ids, labels=labels).loss)


def test_peft_modules_to_save_lm_head(dev):
    peft = _peft()
    base = build("mistral", dev)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"],
                             modules_to_save=["lm_head"])
    ref = peft.get_peft_model(copy.deepcopy(base), config)
    model = peft.get_peft_model(patch(copy.deepcopy(base)), config)
    model.load_state_dict(ref.state_dict())  # LoRA A is initialised at random
    ids, labels = batch(dev)
    want = run(ref, ids, labels)
    got = run(model, ids, labels)
    assert got.logits is None
    assert_loss_close(got.loss, want.loss)
    g = grads(model)
    assert any("modules_to_save" in n and "lm_head" in n for n in g)
    assert_close_grads(g, grads(ref))


def test_unpatch_restores(dev):
    model = build("llama", dev)
    ids, labels = batch(dev)
    patch(model)
    assert is_patched(model)
    unpatch(model)
    assert not is_patched(model)
    assert "forward" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    assert model(input_ids=ids, labels=labels).logits is not None


def test_errors(dev):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=2, n_positions=32))
    with pytest.raises(ValueError, match="'gpt2'"):
        patch(gpt2)
    with pytest.raises(ValueError, match="pretraining_tp"):
        patch(build("llama", dev, pretraining_tp=2))
    model = build("llama", dev)
    with pytest.raises(TypeError, match="softcap"):
        patch(model, softcap=30.0)
    with pytest.raises(TypeError, match="'reductio'"):
        patch(model, reductio="sum")
    assert not is_patched(model)
    assert "llama" in SUPPORTED_MODEL_TYPES


def test_unknown_logits_transform_raises(dev):
    model = patch(build("llama", dev))
    ids, labels = batch(dev)
    original = type(model).forward

    def exotic(self, input_ids=None, labels=None, **kwargs):
        out = original(self, input_ids=input_ids, labels=None, **kwargs)
        out.logits.contiguous()  # what a forward flce does not understand would do
        return out

    model._flce_patch = type(model._flce_patch)(**{**model._flce_patch.__dict__,
                                                   "prev_forward": exotic.__get__(model)})
    with pytest.raises(AttributeError, match="'llama'.*contiguous"):
        model(input_ids=ids, labels=labels)


def test_loss_computed_in_forward_for_old_transformers(dev):
    """transformers < 4.46 computes the loss inline: the forward then runs without labels."""
    ref = build("mixtral", dev)
    model = patch(copy.deepcopy(ref))
    state = model._flce_patch
    model._flce_patch = type(state)(**{**state.__dict__, "loss_in_forward": True})
    ids, labels = batch(dev)
    want = run(ref, ids, labels, num_items_in_batch=torch.tensor(29))
    got = run(model, ids, labels, num_items_in_batch=torch.tensor(29))
    assert got.logits is None
    assert_loss_close(got.loss, want.loss)
    assert_close_grads(grads(model), grads(ref))
