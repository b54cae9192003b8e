"""Elastic structure: full width equals transformers' BertModel; every SubLM equals a
physically pruned copy; reordering keeps the function; bad layouts are refused."""

import pytest
import torch

from elastic.structure import (BertDims, ElasticBert, SubLM, load_state, mha_ffn_params, pack, packed_bytes, permute,
                               prune)


def _load(tiny_dir):
    dims = BertDims.from_config_file(tiny_dir / "config.json")
    m = ElasticBert(dims)
    load_state(tiny_dir / "model.safetensors", m)
    return m.eval()


def _batch(seed=1, B=3, T=11, vocab=30522):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 7:] = 0  # padding in one row
    mask[2, 4:] = 0
    return ids, mask


def test_full_width_equals_transformers_bertmodel(tiny_dir):
    from transformers import BertModel

    ref = BertModel.from_pretrained(tiny_dir, add_pooling_layer=False).eval()
    m = _load(tiny_dir)
    ids, mask = _batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).last_hidden_state
        got = m(ids, mask)
    assert torch.allclose(got[mask.bool()], want[mask.bool()], atol=1e-5)


@pytest.mark.parametrize("heads,neurons", [((4, 4), (37, 37)), ((3, 1), (20, 37)), ((0, 2), (5, 0)), ((1, 0), (0, 1))])
def test_sublm_equals_physically_pruned_copy(tiny_dir, heads, neurons):
    m = _load(tiny_dir)
    s = SubLM(heads, neurons)
    pruned = prune(m, s)
    assert pruned.encoder.layer[0].attention.self.query.weight.shape == (heads[0] * 8, 32)
    assert pruned.encoder.layer[1].output.dense.weight.shape == (32, neurons[1])
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.allclose(m(ids, mask, sublm=s), pruned(ids, mask), atol=1e-6)


def test_packed_levels_equal_slices_and_share_embeddings(tiny_dir):
    m = _load(tiny_dir)
    sublms = {100: m.layout, 50: SubLM((3, 1), (20, 37)), 10: SubLM((1, 0), (0, 1))}
    packed = pack(m, sublms)
    assert packed[100] is m  # the stored layout serves from the stored weights
    ids, mask = _batch()
    for level, s in sublms.items():
        p = packed[level]
        assert p.embeddings is m.embeddings and not p.training
        w = p.encoder.layer[1].output.dense.weight
        assert w.shape == (32, s.neurons[1]) and w.is_contiguous()
        with torch.no_grad():
            assert torch.allclose(p(ids, mask), m(ids, mask, sublm=s), atol=1e-6)
    dims = m.dims
    per_layer_shared = 32 + 2 * 32 + 32 + 2 * 32  # W^O bias, LN1, FFN-out bias, LN2: copied per level
    want = sum(mha_ffn_params(dims, s) + dims.num_hidden_layers * per_layer_shared for s in (sublms[50], sublms[10]))
    assert packed_bytes(m, packed) == 4 * want


def test_pack_refuses_a_sublm_outside_the_layout(tiny_dir):
    m = _load(tiny_dir)
    with pytest.raises(ValueError, match=r"is not within the stored layout"):
        pack(m, {50: SubLM((5, 1), (20, 37))})


def test_slicing_takes_views_not_copies(tiny_dir):
    m = _load(tiny_dir)
    q = m.encoder.layer[0].attention.self.query.weight
    assert q[:8].data_ptr() == q.data_ptr()  # the primitive used by forward


def test_permute_keeps_full_function_and_changes_prefixes(tiny_dir):
    m = _load(tiny_dir)
    ho = [torch.tensor([2, 0, 3, 1]), torch.tensor([3, 2, 1, 0])]
    no = [torch.randperm(37, generator=torch.Generator().manual_seed(l)) for l in range(2)]
    p = permute(m, ho, no)
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.allclose(m(ids, mask), p(ids, mask), atol=1e-5)
        s = SubLM((2, 2), (10, 10))
        assert not torch.allclose(m(ids, mask, sublm=s), p(ids, mask, sublm=s), atol=1e-3)


def test_sublm_outside_layout_is_refused(tiny_dir):
    m = prune(_load(tiny_dir), SubLM((2, 2), (20, 20)))
    ids, mask = _batch()
    with pytest.raises(ValueError, match="not within the stored layout"):
        m(ids, mask, sublm=SubLM((3, 2), (20, 20)))
    with pytest.raises(ValueError, match="heads has 2 layers but neurons has 1"):
        SubLM((1, 1), (3,))


def test_shape_mismatch_names_the_tensor(tiny_dir):
    m = ElasticBert(BertDims.from_config_file(tiny_dir / "config.json"), SubLM((2, 2), (20, 20)))
    with pytest.raises(ValueError, match=r"encoder\.layer\.0\.attention\.self\.query\.weight has shape \(32, 32\)"):
        load_state(tiny_dir / "model.safetensors", m)
