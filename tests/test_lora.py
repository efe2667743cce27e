"""model.py's LoRA against peft 0.21.2 (the oracle, test-only): the same forward and gradients on the same weights,
and our saved adapter, loaded by peft on the transformers base, gives the logits of our merged checkpoint loaded by
transformers. Training runs with --lora-rank are in test_dpo.py and test_sft.py."""
import json
import math

import pytest
import torch

from model import (ADAPTER_CONFIG, ADAPTER_FILE, LORA_TARGETS, LoRAConfig, LoRALinear, ModelConfig, Transformer,
                   add_lora, hf_name, init_weights, load, load_adapter, lora_disabled, save, save_adapter)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

CFG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
TOKENS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))


def ours_with_random_adapters(lora, seed=3):
    """Our model with an adapter whose B is NOT zero (at init B = 0 and the adapter would be invisible)."""
    model = add_lora(init_weights(Transformer(CFG), std=0.1, seed=1), lora)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def peft_model(folder, lora):
    base = transformers.Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.targets), task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config)


def nll(logits):  # a loss whose gradient reaches every adapter
    return -torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, TOKENS[:, 1:, None]).sum()


def test_init_freezes_the_base_and_starts_at_it():
    base = init_weights(Transformer(CFG), std=0.1, seed=1)
    with torch.no_grad():
        before = base(TOKENS)
    model = add_lora(base, LoRAConfig(rank=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.{t}.lora_{ab}.weight" for i in range(2) for ab in "AB"
                         for m, t in [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"),
                                      ("self_attn", "o_proj"), ("mlp", "gate_proj"), ("mlp", "up_proj"),
                                      ("mlp", "down_proj")]}
    q = model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.lora_A.weight.dtype == torch.float32 and q.scaling == 2.0
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) as PEFT (and nn.Linear): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert q.lora_A.weight.abs().max() <= bound and q.lora_A.weight.abs().max() > 0.8 * bound
    assert not q.lora_B.weight.any()
    with torch.no_grad():
        assert torch.equal(model(TOKENS), before)  # B = 0: the base model exactly
    with pytest.raises(ValueError, match="no LoRA"):
        with lora_disabled(init_weights(Transformer(CFG))):
            pass


@pytest.mark.parametrize("targets", [LORA_TARGETS, ("q_proj", "v_proj")])
def test_forward_and_gradients_match_peft(tmp_path, targets):
    lora = LoRAConfig(rank=4, alpha=8, targets=targets)
    ours = ours_with_random_adapters(lora)
    save(init_weights(Transformer(CFG), std=0.1, seed=1), tmp_path / "base")
    theirs = peft_model(tmp_path / "base", lora)
    # Our adapter values into peft's model: its parameter names are ours behind "base_model.model." + hf_name, with
    # the adapter name "default" inside.
    theirs_params = dict(theirs.named_parameters())
    trainable = {n for n, p in theirs_params.items() if p.requires_grad}
    mapping = {n: "base_model.model." + hf_name(n).replace(".lora_A.", ".lora_A.default.").replace(
        ".lora_B.", ".lora_B.default.") for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mapping.values()) == trainable
    with torch.no_grad():
        for n, theirs_name in mapping.items():
            theirs_params[theirs_name].copy_(dict(ours.named_parameters())[n])
    theirs.train()
    ours.train()
    logits_ours, logits_theirs = ours(TOKENS), theirs(input_ids=TOKENS).logits
    torch.testing.assert_close(logits_ours, logits_theirs, rtol=1e-5, atol=1e-5)
    nll(logits_ours).backward()
    nll(logits_theirs).backward()
    for n, theirs_name in mapping.items():
        torch.testing.assert_close(dict(ours.named_parameters())[n].grad, theirs_params[theirs_name].grad,
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    with torch.no_grad(), lora_disabled(ours), theirs.disable_adapter():  # the DPO reference: adapters off
        torch.testing.assert_close(ours(TOKENS), theirs(input_ids=TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_saved_adapter_in_peft_equals_our_merged_checkpoint_in_transformers(tmp_path):
    lora = LoRAConfig(rank=4, alpha=8)
    ours = ours_with_random_adapters(lora)
    save(init_weights(Transformer(CFG), std=0.1, seed=1), tmp_path / "base")
    save(ours, tmp_path / "merged")  # save() merges a LoRA model: a plain checkpoint
    save_adapter(ours, tmp_path / "adapter", base_model=str(tmp_path / "base"))
    with torch.no_grad():
        expected = ours(TOKENS)
        merged = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
        base = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
        torch.testing.assert_close(adapted(input_ids=TOKENS).logits, expected, rtol=1e-5, atol=1e-5)
    # The file's names and config keys are the ones peft writes itself.
    peft_model(tmp_path / "base", lora).save_pretrained(tmp_path / "peft")
    from safetensors import safe_open
    with safe_open(tmp_path / "adapter" / ADAPTER_FILE, "pt") as a, safe_open(tmp_path / "peft" / ADAPTER_FILE, "pt") as b:
        assert set(a.keys()) == set(b.keys()) and all(a.get_tensor(k).shape == b.get_tensor(k).shape for k in a.keys())
    ours_config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    peft_config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    assert set(ours_config) <= set(peft_config)
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora"):
        assert ours_config[key] == peft_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(peft_config["target_modules"])
    # Our loader reads it back (a resume); a different rank is refused.
    again = add_lora(load(tmp_path / "base"), lora)
    load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(TOKENS), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        load_adapter(add_lora(load(tmp_path / "base"), LoRAConfig(rank=2, alpha=4)), tmp_path / "adapter")
