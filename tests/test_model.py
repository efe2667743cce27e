"""model.py against transformers' Qwen2ForCausalLM (the oracle), on small random Qwen2-shaped configs."""
import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import model as M
from conftest import SHARED

SMALL = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6,
             bos_token_id=1, eos_token_id=2)


def hf_reference(tmp_path, tied, seed=0):
    """A transformers model with its own random init, saved by transformers: independent of our code."""
    torch.manual_seed(seed)
    # initializer_range 0.2 (not 0.02): greedy outputs then vary across rows and steps, so comparisons bite
    config = Qwen2Config(**SMALL, tie_word_embeddings=tied, initializer_range=0.2, attn_implementation="eager")
    hf = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # transformers zero-inits biases; random ones make the q/k/v bias path count
        for layer in hf.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
            layer.input_layernorm.weight.normal_(1, 0.2)
    hf.save_pretrained(tmp_path)
    return hf


@pytest.fixture(params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path):
    hf = hf_reference(tmp_path, tied=request.param)
    return hf, M.load(tmp_path)


def test_logits_match_transformers(pair):
    hf, ours = pair
    tokens = torch.randint(0, SMALL["vocab_size"], (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits).abs().max().item()
    assert diff <= 1e-4
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == hf.config.tie_word_embeddings


def test_config_both_rope_forms():
    base = {"model_type": "qwen2", **SMALL}
    top = M.ModelConfig.from_hf({**base, "rope_theta": 123.0})
    nested = M.ModelConfig.from_hf({**{k: v for k, v in base.items() if k != "rope_theta"},
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}})
    assert top.rope_theta == nested.rope_theta == 123.0
    with pytest.raises(ValueError, match="RoPE scaling"):
        M.ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_cached_decoding_equals_full_forward(pair):
    _, ours = pair
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(tokens)
        cache = M.make_cache(ours.config, 2, 20, torch.float32, "cpu")
        steps = [ours(tokens[:, :12], None, cache, 0, torch.ones(12, 12, dtype=torch.bool).tril())]
        for t in range(12, 20):
            pos = torch.full((2, 1), t)
            steps.append(ours(tokens[:, t:t + 1], pos, cache, t))
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5


PROMPTS = [[5, 9, 17, 33, 2, 8, 100], [250, 3], [7, 7, 7, 7], [42]]


def test_ragged_batch_greedy_equals_alone_and_transformers(pair):
    hf, ours = pair
    batch = M.generate(ours, PROMPTS, 12)
    assert len({tok for row in batch for tok in row}) > 12  # not a degenerate model repeating one token
    alone = [M.generate(ours, [p], 12)[0] for p in PROMPTS]
    assert batch == alone
    for prompt, new in zip(PROMPTS, batch):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        assert new == out[0, len(prompt):].tolist()
    # transformers' own left-padded batch gives the same tokens too
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert batch == out[:, width:].tolist()


def test_next_token_logits_of_ragged_prompts_match_transformers(pair):
    hf, ours = pair
    got = M.next_token_logits(ours, PROMPTS)
    for row, prompt in zip(got, PROMPTS):
        with torch.no_grad():
            expected = hf(torch.tensor([prompt])).logits[0, -1]
        assert (row - expected).abs().max().item() <= 1e-4


def test_each_row_stops_at_its_own_stop_id(pair):
    _, ours = pair
    free = M.generate(ours, PROMPTS, 10)
    stop = free[0][3]  # a token row 0 emits at step 3 (ties with earlier steps are fine: first one counts)
    stopped = M.generate(ours, PROMPTS, 10, stop_ids=(stop,))
    for row, full in zip(stopped, free):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:end]
    assert len(stopped[0]) <= 4


def test_stopped_rows_leave_the_batch_without_changing_the_others(pair):
    _, ours = pair
    free = M.generate(ours, PROMPTS, 12)
    # One row runs to the end, the other three stop within their first 6 tokens: the batch shrinks midway.
    for long in range(len(free)):
        early = [next((tok for tok in row[:6] if tok not in free[long]), None)
                 for i, row in enumerate(free) if i != long]
        if None not in early:
            break
    else:
        pytest.skip("random weights repeat the same tokens in every row")
    stop_ids = tuple(set(early))
    stopped = M.generate(ours, PROMPTS, 12, stop_ids=stop_ids, check_every=2)
    for row, full in zip(stopped, free):
        end = next((i + 1 for i, tok in enumerate(full) if tok in stop_ids), len(full))
        assert row == full[:end]
    assert len(stopped[long]) == 12 and sum(len(row) <= 6 for row in stopped) == 3


def test_num_samples_prefills_once_and_greedy_repeats(pair):
    _, ours = pair
    single = M.generate(ours, PROMPTS, 8)
    multi = M.generate(ours, PROMPTS, 8, num_samples=3)
    assert multi == [row for row in single for _ in range(3)]


def test_seed_reproduces_samples(pair):
    _, ours = pair
    kw = dict(temperature=1.0, top_p=0.95, num_samples=4)
    a = M.generate(ours, PROMPTS, 10, seed=7, **kw)
    assert a == M.generate(ours, PROMPTS, 10, seed=7, **kw)
    assert a != M.generate(ours, PROMPTS, 10, seed=8, **kw)


def test_top_k_top_p_stay_in_allowed_set():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen) * 3
    draws = torch.stack([M.sample_next(logits, 1.0, 5, 1.0, gen) for _ in range(500)], 1)
    top5 = logits.topk(5, dim=-1).indices
    assert all(set(draws[r].tolist()) <= set(top5[r].tolist()) for r in range(4))
    # nucleus: the smallest set of most likely tokens whose mass reaches p, written out by hand
    p = 0.7
    draws = torch.stack([M.sample_next(logits, 1.0, 0, p, gen) for _ in range(500)], 1)
    for r in range(4):
        probs = logits[r].double().softmax(-1)
        allowed, mass = set(), 0.0
        for i in probs.argsort(descending=True).tolist():
            allowed.add(i)
            mass += probs[i].item()
            if mass >= p:
                break
        assert set(draws[r].tolist()) <= allowed
        assert len(allowed) == 1 or len(set(draws[r].tolist())) > 1  # it does sample, not argmax
    assert sum(len(set(d.tolist())) for d in draws) > 8


def test_sampling_follows_the_distribution():
    gen = torch.Generator().manual_seed(3)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    n = 20000
    draws = torch.cat([M.sample_next(logits.expand(1000, 4), 1.0, 0, 1.0, gen) for _ in range(n // 1000)])
    freq = torch.bincount(draws, minlength=4).double() / n
    expected = logits[0].double().softmax(-1)
    assert (freq - expected).abs().max().item() < 0.015  # ~4 binomial standard errors


def test_save_then_transformers_loads_identically(tmp_path):
    torch.manual_seed(0)
    ours = M.init_weights(M.Transformer(M.ModelConfig(**SMALL, tie_word_embeddings=False)), std=0.1)
    M.save(ours, tmp_path)
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 16))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5
    assert hf.config.rope_parameters["rope_theta"] == SMALL["rope_theta"]


def test_generation_config_stops_at_the_config_s_own_ids(tmp_path):
    """Qwen2.5-Instruct's ids give its own generation_config ([151645, 151643]); a model with another tokenizer
    (the miniature's student) stops at ITS end-of-turn and end-of-text ids, read back by transformers."""
    from transformers import GenerationConfig
    for name, ids, stop in (("qwen", dict(bos_token_id=151643, eos_token_id=151645), [151645, 151643]),
                            ("other", dict(bos_token_id=0, eos_token_id=5), [5, 0]),
                            ("base", dict(bos_token_id=151643, eos_token_id=151643), [151643])):
        M.save(M.Transformer(M.ModelConfig(**{**SMALL, **ids})), tmp_path / name)
        config = GenerationConfig.from_pretrained(tmp_path / name)
        assert config.eos_token_id == stop and config.bos_token_id == ids["bos_token_id"]


def test_copied_tokenizer_loads_in_transformers_as_the_original(tmp_path):
    """A trained checkpoint carries the real Qwen2.5 tokenizer files (chat template included), so transformers and
    our scripts load the folder alone."""
    from transformers import AutoTokenizer
    source = SHARED / "data" / "qwen2.5-tokenizer"
    if not (source / "tokenizer.json").is_file():
        pytest.skip("real Qwen2.5 tokenizer not in ../shared")
    M.copy_tokenizer(source, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "tokenizer.json", "tokenizer_config.json",
                                                         "vocab.json"]
    text = "<|im_start|>user\n患者男，45岁，胸痛3小时。<|im_end|>\n"
    ids = AutoTokenizer.from_pretrained(source).encode(text)
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text) == ids == M.load_tokenizer(tmp_path).encode(text).ids
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == AutoTokenizer.from_pretrained(source).chat_template


def test_save_preserves_dtype_and_shards(tmp_path):
    ours = M.init_weights(M.Transformer(M.ModelConfig(**SMALL, tie_word_embeddings=True))).to(torch.bfloat16)
    M.save(ours, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / M.INDEX_FILE).read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and "lm_head.weight" not in index["weight_map"]
    assert index["metadata"]["total_size"] == sum(p.numel() * 2 for p in ours.parameters())
    back = M.load(tmp_path, dtype=torch.bfloat16)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 9))
    with torch.no_grad():
        assert torch.equal(back(tokens), hf(tokens).logits)


def test_transformers_sharded_checkpoint_loads(tmp_path):
    hf = hf_reference(tmp_path, tied=False)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / M.INDEX_FILE).is_file()
    ours = M.load(tmp_path / "sharded")
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 10))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-4


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_bad_checkpoints_name_the_tensor(tmp_path):
    hf_reference(tmp_path, tied=False)
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(tmp_path, lambda t: t.pop(name))
    with pytest.raises(M.UserError, match="up_proj"):
        M.load(tmp_path)
    hf_reference(tmp_path, tied=False)
    _rewrite(tmp_path, lambda t: t.__setitem__(name, torch.zeros(3, 3)))
    with pytest.raises(ValueError, match=rf"{name}.*\(3, 3\)"):
        M.load(tmp_path)
    hf_reference(tmp_path, tied=False)
    _rewrite(tmp_path, lambda t: t.__setitem__("model.layers.9.extra", torch.zeros(1)))
    with pytest.raises(M.UserError, match="layers.9.extra"):
        M.load(tmp_path)
    with pytest.raises(M.UserError, match="nowhere: no such folder"):
        M.load(tmp_path / "nowhere")


def test_context_overflow_is_a_clear_error(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="exceeds the context"):
        M.generate(ours, [[1] * 250], 10)


def test_bf16_close_to_transformers_bf16(tmp_path):
    hf_reference(tmp_path, tied=False)
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ours = M.load(tmp_path, dtype=torch.bfloat16)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 24))
    with torch.no_grad():
        a, b = ours(tokens).float(), hf(tokens).logits.float()
    assert (a - b).abs().max().item() <= 0.05 * b.abs().max().item()


def test_yarn_beside_default_rope_parameters_is_an_error():
    """A transformers-5 config (rope_parameters: default) plus the model card's YaRN rope_scaling must not load as
    plain RoPE."""
    base = {"model_type": "qwen2", **SMALL, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    with pytest.raises(ValueError, match="yarn"):
        M.ModelConfig.from_hf({**base, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                        "original_max_position_embeddings": 32768}})
    with pytest.raises(ValueError, match="linear"):
        M.ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    assert M.ModelConfig.from_hf({**base, "rope_scaling": None}).rope_theta == 1e6


@pytest.mark.parametrize("T", [1, 7], ids=["decode", "prefill"])
def test_masked_gqa_attention_equals_float64_math(T):
    """The folded masked GQA path (query groups in the query axis) against attention written out in float64 with
    k/v repeated per query head, for a decode step (T = 1) and a ragged prefill (T > 1) over a cache."""
    cfg = M.ModelConfig(**{**SMALL, "num_attention_heads": 8, "num_key_value_heads": 2})
    attn = M.init_weights(M.Transformer(cfg), std=0.2, seed=3).layers[0].self_attn
    g = torch.Generator().manual_seed(4)
    B, S, start = 3, 12, 12 - T
    x = torch.randn(B, T, cfg.hidden_size, generator=g)
    positions = torch.arange(start, start + T).expand(B, T)
    cos, sin = M.rope_cos_sin(cfg, positions, torch.float32)
    cache = [torch.randn(B, 2, S, cfg.head_dim, generator=g) for _ in range(2)]
    mask = torch.rand(B, 1, T, S, generator=g) > 0.3
    mask[..., start:] |= torch.eye(T, dtype=torch.bool)  # every query sees itself
    with torch.no_grad():
        ours = attn(x, cos, sin, [c.clone() for c in cache], start, mask)  # attends over start + T = S slots
        # the oracle: float64, explicit repeat of each KV head over its 4 query heads
        q = attn.q_proj(x).view(B, T, 8, -1).transpose(1, 2)
        k = attn.k_proj(x).view(B, T, 2, -1).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, 2, -1).transpose(1, 2)
        q, k = M.apply_rope(q, cos, sin), M.apply_rope(k, cos, sin)
        K, V = (c.clone() for c in cache)
        K[:, :, start:], V[:, :, start:] = k, v
        K, V, q = K.double().repeat_interleave(4, 1), V.double().repeat_interleave(4, 1), q.double()
        scores = (q @ K.transpose(-1, -2) / cfg.head_dim ** 0.5).masked_fill(~mask, float("-inf"))
        y = (scores.softmax(-1) @ V).transpose(1, 2).reshape(B, T, -1)
        expected = attn.o_proj(y.float())
    assert (ours - expected).abs().max().item() < 1e-5


def compiled_graphs():
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def test_compiled_decode_equals_eager_without_recompiles(tmp_path):
    """torch.compile (inductor) of the decode step: the same tokens as eager, greedy and sampled, on a ragged
    batch whose rows stop and leave it; a second call of the same shapes compiles nothing new."""
    hf_reference(tmp_path, tied=False)
    ours = M.load(tmp_path)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, SMALL["vocab_size"], (n,), generator=g).tolist() for n in (6, 11, 3, 8)]
    free = M.generate(ours, prompts, 24)
    stop = (free[0][4], free[2][9])  # two rows stop early (the others may too)
    kw = dict(stop_ids=stop, num_samples=2, check_every=2)
    for sampling in ({"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}):
        eager = M.generate(ours, prompts, 24, **sampling, **kw)
        assert M.generate(ours, prompts, 24, compile=True, **sampling, **kw) == eager
    assert any(len(row) < 24 for row in eager) and any(len(row) == 24 for row in eager)  # rows left the batch
    warm = compiled_graphs()
    other = [torch.randint(3, SMALL["vocab_size"], (n,), generator=g).tolist() for n in (6, 11, 3, 8)]
    assert M.generate(ours, other, 24, compile=True, **kw) == M.generate(ours, other, 24, **kw)
    assert compiled_graphs() == warm


def test_command_line_prompt_is_the_chat_template_text():
    """model.py's command line cannot import templates (the bottom file), so its default prompt is written out."""
    import templates as T
    assert M.CHAT_EXAMPLE == T.chat([{"role": "user", "content": "患者，男，45岁，胸痛3小时。最可能的诊断是什么？"}])
