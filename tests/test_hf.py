"""seqzoo models as transformers models: config, save/load, generate through SeqzooCache, the Auto
classes, and the errors of what a recurrent state cannot do. Runs under transformers 4.x and 5.x."""

import json

import pytest
import torch

import seqzoo

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import seqzoo.hf as H  # noqa: E402

#: every layer seqzoo itself ships: a missing one fails here instead of being skipped
BUILTIN_LAYERS = [
    "deltanet", "gated_deltanet", "gla", "hgrn2", "linear_attention", "longhorn", "mamba", "mamba2", "mesanet",
    "retnet", "rnn", "self_attention", "sliding_window_attention", "titans", "ttt_linear", "ttt_mlp", "ttt_nw",
]
#: and every layer an installed plugin adds (the example plugin's, in CI)
LAYERS = BUILTIN_LAYERS + sorted(set(seqzoo.list_layers()) - set(BUILTIN_LAYERS))
VOCAB = 48


def _model(layer, backbone="transformer", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = H.SeqzooConfig(layer=layer, backbone=backbone, vocab_size=VOCAB, d_model=32, n_layers=2, **kw)
    return H.SeqzooForCausalLM(cfg).eval()


def _prompt(batch=2, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def _greedy(model, ids, n, **kw):
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                          pad_token_id=VOCAB - 1, **kw)


def test_every_builtin_layer_is_registered():
    builtin = sorted(n for n in seqzoo.list_layers() if seqzoo.layer_spec(n).distribution == "seqzoo")
    assert builtin == BUILTIN_LAYERS


def test_config_records_the_model_and_where_its_layer_comes_from(tmp_path):
    cfg = H.SeqzooConfig(layer="rnn", backbone="mamba", d_model=16, n_layers=3, vocab_size=40,
                         layer_config={"state_dim": 8})
    assert (cfg.plugin, cfg.plugin_distribution, cfg.plugin_version) == ("rnn", "seqzoo", seqzoo.__version__)
    assert cfg.hidden_size == 16 and cfg.num_hidden_layers == 3
    mc = cfg.model_config()
    assert (mc.layer, mc.backbone, mc.d_model, mc.n_layers, mc.vocab_size, mc.layer_config) == \
        ("rnn", "mamba", 16, 3, 40, {"state_dim": 8})
    cfg.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "seqzoo"
    # written in full, defaults included
    for key, want in {"layer": "rnn", "backbone": "mamba", "tie_embeddings": True, "mlp": True,
                      "plugin_distribution": "seqzoo", "layer_config": {"state_dim": 8}}.items():
        assert saved[key] == want, key
    back = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(back, H.SeqzooConfig) and back.model_config() == mc


def test_config_from_a_model_config_round_trips():
    lm = seqzoo.create_model("gla", "mamba", vocab_size=30, d_model=16, n_layers=1, tie_embeddings=False)
    assert H.SeqzooConfig.from_model_config(lm.config).model_config() == lm.config


@pytest.mark.parametrize("backbone", ["transformer", "mamba"])
@pytest.mark.parametrize("layer", LAYERS)
def test_save_load_and_greedy_generate_match_seqzoo(layer, backbone, tmp_path):
    """from_pretrained restores bit-identical logits, and greedy generate through the cache gives the
    tokens of ``LanguageModel.generate`` (prompt by forward, then step per token)."""
    model = _model(layer, backbone)
    ids = _prompt()
    with torch.no_grad():
        want = model.model.generate(ids, 8, temperature=0)
        assert torch.equal(_greedy(model, ids, 8), want)
        model.save_pretrained(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".json", ".safetensors", ".bin")) == \
            ["config.json", "generation_config.json", "model.safetensors"]
        back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert type(back) is H.SeqzooForCausalLM
        assert torch.equal(back(ids).logits, model(ids).logits)
        for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), name


def test_untied_head_is_saved_and_restored(tmp_path):
    from safetensors.torch import load_file

    model = _model("rnn", tie_embeddings=False)
    tied = _model("rnn")
    model.save_pretrained(tmp_path / "untied")
    tied.save_pretrained(tmp_path / "tied")
    assert "model.lm_head.weight" in load_file(tmp_path / "untied" / "model.safetensors")
    assert "model.lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "untied")
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert not torch.equal(back.model.lm_head.weight, back.model.embed_tokens.weight)


def test_forward_loss_is_next_token_cross_entropy():
    model = _model("linear_attention")
    ids = _prompt(length=9)
    labels = ids.clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels)
    logits = model.model(ids)[0]
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=0)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    # the Trainer's gradient accumulation: the sum over this batch divided by the accumulated count
    summed = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                               ignore_index=-100, reduction="sum")
    torch.testing.assert_close(model(ids, labels=labels, num_items_in_batch=40).loss, summed / 40)
    with pytest.raises(ValueError, match="labels of shape"):
        model(ids, labels=labels[:, :-1])


def test_a_training_step_keeps_no_state_unless_asked():
    model = _model("rnn").train()
    ids = _prompt()
    assert getattr(model(ids), H._CACHE_FIELD) is None
    assert isinstance(getattr(model(ids, use_cache=True), H._CACHE_FIELD), H.SeqzooCache)
    assert isinstance(getattr(model.eval()(ids), H._CACHE_FIELD), H.SeqzooCache)


def test_cache_continues_exactly_where_forward_left_off():
    """Prompt in two chunks then tokens one at a time through the cache = one forward over all."""
    model = _model("ttt_linear", "mamba")
    ids = _prompt(length=12)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :5])
        cache = getattr(out, H._CACHE_FIELD)
        assert isinstance(cache, H.SeqzooCache) and cache.get_seq_length() == 5 and len(cache) == 2
        parts = [out.logits, model(ids[:, 5:9], **{H._CACHE_FIELD: cache}).logits]
        for t in range(9, 12):
            parts.append(model(ids[:, t:t + 1], **{H._CACHE_FIELD: cache}).logits)
        assert cache.get_seq_length() == 12 and cache.batch_size == 2
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_stops_at_eos_and_pads_after_it():
    model = _model("rnn")
    ids = _prompt(batch=3)
    with torch.no_grad():
        free = _greedy(model, ids, 10)
        eos = int(free[0, ids.shape[1] + 2])  # the third new token of the first sequence
        out = _greedy(model, ids, 10, eos_token_id=eos)
    for row, full in zip(out, free):
        new, full_new = row[ids.shape[1]:], full[ids.shape[1]:]
        hits = (full_new == eos).nonzero()
        if len(hits):
            k = int(hits[0])
            assert torch.equal(new[:k + 1], full_new[:k + 1])
            assert bool((new[k + 1:] == VOCAB - 1).all())  # padded after its eos
        else:
            assert torch.equal(new, full_new[:len(new)])
    assert out.shape[1] <= free.shape[1]


@pytest.mark.parametrize("layer", ["mamba", "self_attention"])
def test_sampling_through_the_cache_equals_sampling_without_it(layer):
    """Sampling (temperature, top-k, top-p) with the O(1) state gives the tokens of sampling with a
    full forward over the whole sequence at every step, from the same seed."""
    model = _model(layer)
    ids = _prompt()
    kw = dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9, max_new_tokens=12, pad_token_id=VOCAB - 1,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        torch.manual_seed(5)
        cached = model.generate(ids, **kw)
        torch.manual_seed(5)
        full = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, full)
    assert cached.shape == (2, ids.shape[1] + 12)


def test_top_k_one_is_greedy():
    model = _model("gla")
    ids = _prompt()
    with torch.no_grad():
        sampled = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=1,
                                 max_new_tokens=6, pad_token_id=VOCAB - 1)
        assert torch.equal(sampled, model.model.generate(ids, 6, temperature=0))


@pytest.mark.parametrize("layer", ["ttt_mlp", "mamba2"])
def test_beam_search_reorders_the_state(layer):
    """Beam search through the cache (the state reordered by beam at every step) = beam search that
    recomputes every beam from its tokens."""
    model = _model(layer)
    ids = _prompt()
    kw = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=6, pad_token_id=VOCAB - 1,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        cached = model.generate(ids, **kw)
        full = model.generate(ids, use_cache=False, **kw)
    assert cached.shape == (4, ids.shape[1] + 6)
    assert torch.equal(cached, full)


def test_cache_reorder_and_repeat_act_on_the_batch_dimension():
    model = _model("rnn", "mamba")
    ids = _prompt(batch=3)
    with torch.no_grad():
        cache = getattr(model(ids), H._CACHE_FIELD)
    before = cache.model_state()
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    after = cache.model_state()
    assert set(after) == set(before) and any(k.endswith("preconv") for k in after)
    for k in before:
        assert torch.equal(after[k], before[k][[2, 2, 0]]), k
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 6
    cache.reset()
    assert cache.model_state() is None and cache.get_seq_length() == 0


def test_what_a_recurrent_state_cannot_do_raises():
    model = _model("mamba")
    ids = _prompt()
    with pytest.raises(ValueError, match="padded batches"):
        model(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="input_ids, not inputs_embeds"):
        model(inputs_embeds=torch.zeros(2, 6, 32))
    with pytest.raises(ValueError, match="hidden states"):
        model(ids, output_hidden_states=True)
    with pytest.raises(ValueError, match="positions that follow its cache"):
        model(ids, position_ids=torch.arange(1, 7)[None].expand(2, 6))
    assert model(ids, position_ids=torch.arange(6)[None].expand(2, 6), cache_position=torch.arange(6)).logits.shape \
        == (2, 6, VOCAB)
    with pytest.raises(TypeError, match="unexpected arguments"):
        model(ids, token_type_ids=ids)
    with pytest.raises(TypeError, match="SeqzooCache"):
        model(ids, **{H._CACHE_FIELD: object()})
    with torch.no_grad():
        cache = getattr(model(ids), H._CACHE_FIELD)
    with pytest.raises(NotImplementedError, match="rolled back"):
        cache.crop(3)
    # assisted decoding and contrastive search roll the cache back: refused before any work
    assistant = _model("mamba", seed=1)
    for option in (dict(assistant_model=assistant), dict(prompt_lookup_num_tokens=3),
                   dict(penalty_alpha=0.6, top_k=4)):
        with pytest.raises(ValueError, match="roll the cache back"):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=VOCAB - 1,
                           **option)


def test_a_missing_plugin_names_the_distribution_to_install(tmp_path):
    _model("rnn").save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.update(layer="holo_rnn", plugin="holo", plugin_distribution="seqzoo-holo", plugin_version="1.2.0")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(H.MissingLayerPlugin, match=r"distribution 'seqzoo-holo'.*pip install 'seqzoo-holo==1\.2\.0'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    cfg = H.SeqzooConfig(layer="holo_rnn")
    assert cfg.plugin_distribution is None
    with pytest.raises(H.MissingLayerPlugin, match="no installed plugin registers"):
        H.SeqzooForCausalLM(cfg)


def test_a_third_party_layer_saves_loads_and_generates(tmp_path):
    class Leaky(seqzoo.SequenceLayer):
        """h_t = 0.5 h_{t-1} + W x_t."""

        def __init__(self, d_model, decay=0.5):
            super().__init__(d_model)
            self.decay = float(torch.tensor(decay).clamp(0, 1).item())  # a constructor that computes
            self.w = torch.nn.Linear(d_model, d_model)

        def init_state(self, batch_size, *, device=None, dtype=None):
            return {"h": torch.zeros(batch_size, self.d_model, device=device, dtype=dtype)}

        def state_size(self, seq_len):
            return self.d_model

        def step(self, x, state):
            state = self.check_input(x, state, step=True)
            h = self.decay * state["h"] + self.w(x)
            return h, {"h": h}

        def forward(self, x, state=None):
            state = self.check_input(x, state)
            ys = []
            for t in range(x.shape[1]):
                y, state = self.step(x[:, t], state)
                ys.append(y)
            return torch.stack(ys, 1), state

    class Plugin:
        @seqzoo.hookimpl
        def register_layers(self, register):
            register("hf_leaky", Leaky, description="test layer")

    seqzoo.register_plugin(Plugin(), "hf_test_plugin")
    try:
        model = _model("hf_leaky", "mamba")
        assert model.config.plugin == "hf_test_plugin"
        ids = _prompt()
        with torch.no_grad():
            assert torch.equal(_greedy(model, ids, 5), model.model.generate(ids, 5, temperature=0))
        model.save_pretrained(tmp_path)
        back = AutoModelForCausalLM.from_pretrained(tmp_path)
        with torch.no_grad():
            assert torch.equal(back(ids).logits, model(ids).logits)
        lm = seqzoo.create_model("hf_leaky", vocab_size=VOCAB, d_model=16, n_layers=1)
        H.save_language_model(lm, tmp_path / "wrapped")
        with torch.no_grad():
            assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "wrapped")(ids).logits, lm(ids)[0])
    finally:
        seqzoo.unregister_plugin("hf_test_plugin")
    with pytest.raises(H.MissingLayerPlugin, match="hf_leaky"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_language_model_and_a_converted_checkpoint_save_the_same_way(tmp_path):
    """``from_language_model`` wraps a built model (as the converters give) without copying it."""
    torch.manual_seed(3)
    lm = seqzoo.create_model("mamba", "mamba", vocab_size=VOCAB, d_model=32, n_layers=2, residual_in_fp32=True)
    wrapped = H.SeqzooForCausalLM.from_language_model(lm)
    assert wrapped.model is lm
    H.save_language_model(lm, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = _prompt()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, lm(ids)[0])
    with pytest.raises(TypeError, match="LanguageModel"):
        H.SeqzooForCausalLM.from_language_model(torch.nn.Linear(2, 2))


def test_the_byte_tokenizer_is_utf8_bytes_whatever_the_text():
    tok = H.byte_tokenizer()
    for text in ("plain ascii", "Latvian Ā and ā", "NUL \x00 inside", "✓ ünïcödé", "  spaces\t\n"):
        ids = tok(text)["input_ids"]
        assert ids == list(text.encode()), text
        assert tok.decode(ids) == text
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (0, 0, 256)
