"""Elastic structure (paper §4.1): one BERT encoder whose SubLMs are per-layer prefixes.

Heads and FFN neurons of every layer are stored in expressive-score order (training/prune.py
reorders them), so a SubLM keeping ``h_l`` heads and ``n_l`` neurons in layer ``l`` uses the
first ``h_l * d_head`` rows of W^Q, W^K, W^V, the first ``h_l * d_head`` columns of W^O, the
first ``n_l`` rows of W^I and the first ``n_l`` columns of the FFN output matrix. The slices are
views taken inside ``forward``; nothing on the module changes when the SubLM changes, so one
worker serves consecutive batches at different preserving levels.

Parameter names are those of transformers' ``BertModel`` (``encoder.layer.0.attention.self.query
.weight`` ...), so any local BERT-family checkpoint loads with safetensors, and the exported
largest SubLM is a BERT state dict whose layers have ragged widths (given by submap.json).

transformers 5 removed ``prune_heads`` and ``head_mask`` (PRs #41076, #41417), hence this module.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SubLM:
    """Per-layer widths of one SubLM: a prefix of heads and FFN neurons in every layer.

    Attributes:
        heads: heads kept in each layer, ``len == num_layers``; 0 skips that layer's attention.
        neurons: FFN neurons kept in each layer, ``len == num_layers``; 0 skips the FFN matmuls.
    """

    heads: tuple[int, ...]
    neurons: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(int(h) for h in self.heads))
        object.__setattr__(self, "neurons", tuple(int(n) for n in self.neurons))
        if len(self.heads) != len(self.neurons):
            raise ValueError(
                f"SubLM heads has {len(self.heads)} layers but neurons has {len(self.neurons)}"
            )
        if any(h < 0 for h in self.heads) or any(n < 0 for n in self.neurons):
            raise ValueError(f"SubLM widths must be >= 0, got heads={self.heads} neurons={self.neurons}")

    def within(self, other: "SubLM") -> bool:
        """True when every layer of ``self`` is at most as wide as ``other`` (nesting)."""
        return len(self.heads) == len(other.heads) and all(
            a <= b for a, b in zip(self.heads + self.neurons, other.heads + other.neurons)
        )


@dataclass(frozen=True)
class BertDims:
    """Shape hyper-parameters of a BERT encoder (names follow transformers' BertConfig)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_config_file(cls, path: Path) -> "BertDims":
        """Read a transformers ``config.json``; raises ValueError naming a missing field."""
        cfg = json.loads(Path(path).read_text())
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: hidden_act={cfg['hidden_act']!r} is not supported (only 'gelu')")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type must be 'absolute'")
        kwargs = {}
        for name, field in cls.__dataclass_fields__.items():
            if name in cfg:
                kwargs[name] = cfg[name]
            elif field.default is MISSING:  # a field without default is required
                raise ValueError(f"{path}: field {name!r} is missing")
        dims = cls(**kwargs)
        if dims.hidden_size % dims.num_attention_heads:
            raise ValueError(f"{path}: hidden_size is not a multiple of num_attention_heads")
        return dims

    def full(self) -> SubLM:
        """The unpruned layout: every head and neuron in every layer."""
        L = self.num_hidden_layers
        return SubLM((self.num_attention_heads,) * L, (self.intermediate_size,) * L)


class _Embeddings(nn.Module):
    def __init__(self, d: BertDims):
        super().__init__()
        self.word_embeddings = nn.Embedding(d.vocab_size, d.hidden_size, padding_idx=d.pad_token_id)
        self.position_embeddings = nn.Embedding(d.max_position_embeddings, d.hidden_size)
        self.token_type_embeddings = nn.Embedding(d.type_vocab_size, d.hidden_size)
        self.LayerNorm = nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)  # (B, T, d)


class _Dense(nn.Module):
    """Linear + LayerNorm, named like BertSelfOutput / BertOutput."""

    def __init__(self, n_in: int, d: BertDims):
        super().__init__()
        self.dense = nn.Linear(n_in, d.hidden_size)
        self.LayerNorm = nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps)


class _SelfAttn(nn.Module):
    def __init__(self, width: int, d: BertDims):
        super().__init__()
        self.query = nn.Linear(d.hidden_size, width)
        self.key = nn.Linear(d.hidden_size, width)
        self.value = nn.Linear(d.hidden_size, width)


class _Attention(nn.Module):
    def __init__(self, heads: int, d: BertDims):
        super().__init__()
        self.self = _SelfAttn(heads * d.head_dim, d)
        self.output = _Dense(heads * d.head_dim, d)


class _Intermediate(nn.Module):
    def __init__(self, neurons: int, d: BertDims):
        super().__init__()
        self.dense = nn.Linear(d.hidden_size, neurons)


class _Layer(nn.Module):
    def __init__(self, heads: int, neurons: int, d: BertDims):
        super().__init__()
        self.attention = _Attention(heads, d)
        self.intermediate = _Intermediate(neurons, d)
        self.output = _Dense(neurons, d)


class _Encoder(nn.Module):
    def __init__(self, layout: SubLM, d: BertDims):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(h, n, d) for h, n in zip(layout.heads, layout.neurons))


def _linear_rows(x: torch.Tensor, lin: nn.Linear, k: int) -> torch.Tensor:
    """x @ W[:k].T + b[:k]: the first k output units of ``lin`` (a view of its weight)."""
    return F.linear(x, lin.weight[:k], lin.bias[:k])


class ElasticBert(nn.Module):
    """A BERT encoder with one set of weights serving every nested SubLM.

    Args:
        dims: shape hyper-parameters of the base model.
        layout: widths physically stored per layer (the teacher's full widths, or the largest
            SubLM after export); every SubLM passed to ``forward`` must lie within it.
    """

    def __init__(self, dims: BertDims, layout: SubLM | None = None):
        super().__init__()
        self.dims = dims
        self.layout = layout or dims.full()
        if len(self.layout.heads) != dims.num_hidden_layers:
            raise ValueError(
                f"layout has {len(self.layout.heads)} layers, config has {dims.num_hidden_layers}"
            )
        if not self.layout.within(dims.full()):
            raise ValueError(f"layout {self.layout} is wider than the base config")
        self.embeddings = _Embeddings(dims)
        self.encoder = _Encoder(self.layout, dims)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        sublm: SubLM | None = None,
        head_gates: list[torch.Tensor] | None = None,
        neuron_gates: list[torch.Tensor] | None = None,
        all_hidden_states: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """Run the SubLM ``sublm`` (default: the whole stored layout).

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for tokens, 0 for padding.
            token_type_ids: (B, T) or None (all zeros).
            sublm: the active SubLM; must lie within ``self.layout``.
            head_gates: per layer a (h_l,) tensor ξ multiplying each head's output, eq. (3);
                only for expressive scores (training/importance.py), held at 1.
            neuron_gates: per layer a (n_l,) tensor ν multiplying each GELU output, eq. (4).
            all_hidden_states: return every layer's input as well (relation distillation
                reads the input of the teacher's last layer, training/relations.py).

        Returns:
            (B, T, hidden) last hidden states; with ``all_hidden_states`` a list of L + 1 such
            tensors: the embeddings' output, then each layer's output (as transformers'
            ``output_hidden_states``).

        Raises:
            ValueError: if ``sublm`` is not within the stored layout.
        """
        sub = sublm or self.layout
        if not sub.within(self.layout):
            raise ValueError(f"SubLM {sub} is not within the stored layout {self.layout}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        dh = self.dims.head_dim
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, d)
        B, T, _ = x.shape
        # additive mask, (B, 1, 1, T): 0 for tokens, dtype-min for padding (as BertModel)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        states = [x]
        for l, layer in enumerate(self.encoder.layer):
            h, n = sub.heads[l], sub.neurons[l]
            att = layer.attention
            if h > 0:
                w = h * dh
                q = _linear_rows(x, att.self.query, w).view(B, T, h, dh).transpose(1, 2)  # (B, h, T, dh)
                k = _linear_rows(x, att.self.key, w).view(B, T, h, dh).transpose(1, 2)
                v = _linear_rows(x, att.self.value, w).view(B, T, h, dh).transpose(1, 2)
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, T, dh)
                if head_gates is not None:
                    ctx = ctx * head_gates[l].view(1, h, 1, 1)
                ctx = ctx.transpose(1, 2).reshape(B, T, w)
                a = F.linear(ctx, att.output.dense.weight[:, :w], att.output.dense.bias)
            else:  # no head kept: the block adds only its output bias
                a = att.output.dense.bias.expand_as(x)
            x = att.output.LayerNorm(a + x)
            if n > 0:
                inter = F.gelu(_linear_rows(x, layer.intermediate.dense, n))  # (B, T, n)
                if neuron_gates is not None:
                    inter = inter * neuron_gates[l]
                f = F.linear(inter, layer.output.dense.weight[:, :n], layer.output.dense.bias)
            else:
                f = layer.output.dense.bias.expand_as(x)
            x = layer.output.LayerNorm(f + x)
            states.append(x)
        return states if all_hidden_states else x


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """Sentence embedding from last hidden states.

    Args:
        hidden: (B, T, d); attention_mask: (B, T).
        mode: "mean" (masked mean over tokens, sentence-transformers' default) or "cls".
        normalize: L2-normalize the result (all-MiniLM-L6-v2 has a Normalize module).

    Returns:
        (B, d) embeddings.
    """
    if mode == "cls":
        e = hidden[:, 0]
    elif mode == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        e = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    else:
        raise ValueError(f"pooling mode must be 'mean' or 'cls', got {mode!r}")
    return F.normalize(e, dim=-1) if normalize else e


def prune(model: ElasticBert, sublm: SubLM, share_embeddings: bool = False) -> ElasticBert:
    """A physically pruned copy of ``model`` holding exactly ``sublm`` (contiguous tensors).

    ``prune(model, s)(x)`` equals ``model(x, sublm=s)``; the tests prove it with allclose, and
    training/prune.py exports the largest SubLM with it.

    Args:
        share_embeddings: the copy uses ``model``'s own embeddings module (the same parameters,
            not a copy; 11.7 M of the 12.5 M parameters of a 5 % SubLM of all-MiniLM-L6-v2), so
            only the encoder layers are copied (``pack``).
    """
    if not sublm.within(model.layout):
        raise ValueError(f"SubLM {sublm} is not within the stored layout {model.layout}")
    out = ElasticBert(model.dims, sublm)
    if share_embeddings:
        out.embeddings = model.embeddings
    dh = model.dims.head_dim
    sd = {}
    for name, t in model.state_dict().items():
        sd[name] = t
        if name.startswith("encoder.layer."):
            l = int(name.split(".")[2])
            w, n = sublm.heads[l] * dh, sublm.neurons[l]
            if ".attention.self." in name:
                sd[name] = t[:w]
            elif name.endswith("attention.output.dense.weight"):
                sd[name] = t[:, :w]
            elif ".intermediate.dense." in name:
                sd[name] = t[:n]
            elif name.endswith(".output.dense.weight") and ".attention." not in name:
                sd[name] = t[:, :n]
    out.load_state_dict({k: v if share_embeddings and k.startswith("embeddings.") else v.contiguous().clone()
                         for k, v in sd.items()})
    return out


def pack(model: ElasticBert, sublms: dict[int, SubLM]) -> dict[int, ElasticBert]:
    """Per preserving level, a pruned copy of ``model``'s encoder layers in contiguous tensors,
    all sharing ``model``'s embeddings; the level whose SubLM is the stored layout is ``model``
    itself. For serving: a sliced forward reads a small SubLM's W^O and FFN-output columns as
    strided views of the stored (largest) matrices, a packed one reads dense matrices of its own.

    The copies are taken now and do not follow later changes to ``model``'s weights (training
    keeps slicing). They cost the encoder-layer parameters of every level below the stored one
    (``mha_ffn_params``); ``packed_bytes`` counts them.

    Args:
        model: the elastic model (eval mode is carried over).
        sublms: level (percent) -> SubLM, each within ``model.layout``.

    Returns:
        level -> an ElasticBert whose ``forward`` with no ``sublm`` equals
        ``model(..., sublm=sublms[level])``.

    Raises:
        ValueError: a SubLM is not within the stored layout (names it).
    """
    out = {}
    for level, sub in sublms.items():
        out[level] = model if sub == model.layout else prune(model, sub, share_embeddings=True).train(model.training)
    return out


def packed_bytes(model: ElasticBert, packed: dict[int, ElasticBert]) -> int:
    """Bytes the packed copies add to ``model``: their own parameters and buffers, shared
    embeddings and ``model`` itself not counted."""
    own = {t.data_ptr() for t in model.state_dict().values()}
    seen, n = set(), 0
    for m in packed.values():
        for t in m.state_dict().values():
            if t.data_ptr() not in own and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                n += t.numel() * t.element_size()
    return n


def permute(model: ElasticBert, head_order: list[torch.Tensor], neuron_order: list[torch.Tensor]) -> ElasticBert:
    """A copy of ``model`` whose heads and neurons in layer l follow ``head_order[l]`` /
    ``neuron_order[l]`` (index tensors, most expressive first). The function computed by the
    full layout is unchanged (heads and neurons are summands, eq. 1-2)."""
    dh = model.dims.head_dim
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for l in range(model.dims.num_hidden_layers):
        p = f"encoder.layer.{l}."
        rows = (head_order[l][:, None] * dh + torch.arange(dh)).reshape(-1)  # head -> its dh rows
        for m in ("query", "key", "value"):
            for s in ("weight", "bias"):
                sd[f"{p}attention.self.{m}.{s}"] = sd[f"{p}attention.self.{m}.{s}"][rows]
        sd[f"{p}attention.output.dense.weight"] = sd[f"{p}attention.output.dense.weight"][:, rows]
        sd[f"{p}intermediate.dense.weight"] = sd[f"{p}intermediate.dense.weight"][neuron_order[l]]
        sd[f"{p}intermediate.dense.bias"] = sd[f"{p}intermediate.dense.bias"][neuron_order[l]]
        sd[f"{p}output.dense.weight"] = sd[f"{p}output.dense.weight"][:, neuron_order[l]]
    out = ElasticBert(model.dims, model.layout)
    out.load_state_dict(sd)
    return out


def mha_ffn_params(dims: BertDims, sublm: SubLM) -> int:
    """Parameters of the prunable units: per head 4·d·d_head + 3·d_head (Q, K, V biases),
    per neuron 2·d + 1 (the W^O bias and LayerNorms are shared and not counted)."""
    d, dh = dims.hidden_size, dims.head_dim
    return sum(h * (4 * d * dh + 3 * dh) + n * (2 * d + 1) for h, n in zip(sublm.heads, sublm.neurons))


def total_params(dims: BertDims, sublm: SubLM) -> int:
    """All parameters the SubLM uses: embeddings, LayerNorms, shared biases and its units."""
    d = dims.hidden_size
    emb = (dims.vocab_size + dims.max_position_embeddings + dims.type_vocab_size) * d + 2 * d
    shared = dims.num_hidden_layers * (d + 2 * d + d + 2 * d)  # W^O bias, LN1, FFN-out bias, LN2
    return emb + shared + mha_ffn_params(dims, sublm)


def gflops(dims: BertDims, sublm: SubLM, seq_len: int = 128) -> float:
    """Forward GFLOPs (2 per multiply-add) of the encoder layers for one ``seq_len``-token
    sequence: Q/K/V/O projections, QK^T and attention·V, and the two FFN matmuls."""
    d, dh, n_tok = dims.hidden_size, dims.head_dim, seq_len
    flops = 0
    for h, n in zip(sublm.heads, sublm.neurons):
        w = h * dh
        flops += 2 * n_tok * d * w * 4  # Q, K, V, O
        flops += 2 * n_tok * n_tok * w * 2  # scores and context
        flops += 2 * n_tok * d * n * 2  # FFN in and out
    return flops / 1e9


def load_state(path: Path, model: ElasticBert, raw: dict[str, torch.Tensor] | None = None) -> None:
    """Load a safetensors BERT state dict into ``model``.

    Accepts transformers' BertModel names, with or without a ``bert.`` prefix; ignores keys the
    encoder does not use (pooler, MLM head, ``embeddings.position_ids``). ``raw``: the file's
    tensors when the caller has read them already (``path`` then only names them in errors).

    Raises:
        ValueError: a weight is missing or its shape differs from the model's layout; the
            message names the tensor, both shapes and the layer.
    """
    from safetensors.torch import load_file

    if raw is None:
        raw = load_file(str(path))
    if any(k.startswith("bert.") for k in raw):
        raw = {k[len("bert."):]: v for k, v in raw.items() if k.startswith("bert.")}
    own = model.state_dict()
    missing = [k for k in own if k not in raw]
    if missing:
        raise ValueError(f"{path}: weights missing for {missing[:3]} ({len(missing)} in all)")
    for k, v in own.items():
        if raw[k].shape != v.shape:
            raise ValueError(
                f"{path}: {k} has shape {tuple(raw[k].shape)}, the layout expects {tuple(v.shape)}"
            )
    model.load_state_dict({k: raw[k] for k in own})


def save_state(model: ElasticBert, path: Path) -> None:
    """Write the model's weights as safetensors with BertModel names."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
