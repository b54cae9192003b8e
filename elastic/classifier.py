"""ElasticLM for sequence classification and regression (GLUE, paper §5.1): the elastic encoder
plus BERT's pooler and a classifier, shared by every SubLM.

Only the encoder is elastic: the pooler (dense + tanh) and the classifier are read by every SubLM
at full width, as in DynaBERT and the paper's GLUE models. The pooler reads [CLS] (BERT's
BertPooler, ``classifier_pooling: "cls"``) or the mean of the unpadded tokens (``"mean"``, how
sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained); config.json's
``classifier_pooling`` says which (the name ModernBERT's config uses; absent = "cls").

A model directory is a transformers ``BertForSequenceClassification`` checkpoint (tensor names
``bert.*``, ``bert.pooler.dense.*``, ``classifier.*``; ``num_labels`` / ``id2label`` in
config.json), plus submap.json when it is elastic; so a user's own fine-tuned BERT classifier loads
as a teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from elastic.glue import GlueTask
from elastic.structure import BertDims, ElasticBert, SubLM, load_state, pool, prune
from elastic.submap import Submap


def config_num_labels(config: dict) -> int | None:
    """Outputs of a checkpoint's classifier according to its config.json: ``num_labels``, else
    the size of ``id2label``; None when the config says neither (a plain pretrained BERT)."""
    if "num_labels" in config:
        return int(config["num_labels"])
    if isinstance(config.get("id2label"), dict):
        return len(config["id2label"])
    return None


POOLINGS = ("cls", "mean")


class _Pooler(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)


class ElasticClassifier(nn.Module):
    """ElasticBert + pooler + classifier.

    Args:
        dims: the encoder's shape; layout: widths stored per layer (see ElasticBert).
        num_labels: classifier outputs (1 = regression).
        dropout: dropout on the pooled output during training (BERT's hidden_dropout_prob);
            the encoder itself has none.
        pooling: what the pooler reads, "cls" ([CLS], BertPooler) or "mean" (the masked mean of
            the last hidden states).

    Raises:
        ValueError: ``pooling`` is not one of POOLINGS.
    """

    def __init__(self, dims: BertDims, layout: SubLM | None, num_labels: int, dropout: float = 0.1,
                 pooling: str = "cls"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"classifier_pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.bert = ElasticBert(dims, layout)
        self.pooler = _Pooler(dims.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(dims.hidden_size, num_labels)
        nn.init.normal_(self.classifier.weight, std=0.02)  # BertPreTrainedModel's initializer_range
        nn.init.zeros_(self.classifier.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                sublm: SubLM | None = None, head_gates: list[torch.Tensor] | None = None,
                neuron_gates: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, T) token ids, mask and segment ids -> (B, num_labels) logits of SubLM ``sublm``
        (default: the stored layout). ``head_gates`` / ``neuron_gates``: see ElasticBert (only
        for expressive scores). Raises ValueError when ``sublm`` is not within the layout."""
        h = self.bert(input_ids, attention_mask, token_type_ids, sublm=sublm, head_gates=head_gates,
                      neuron_gates=neuron_gates)  # (B, T, d)
        return self.head(h, attention_mask)

    def head(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d) last hidden states -> (B, num_labels): the pooler (dense + tanh) on [CLS] or
        on the mean of the tokens that ``attention_mask`` (B, T) keeps, dropout, classifier.

        Raises ValueError when mean pooling gets no mask."""
        if self.pooling == "mean" and attention_mask is None:
            raise ValueError("mean pooling needs the attention mask")
        x = pool(hidden, attention_mask, self.pooling, normalize=False)  # (B, d)
        pooled = torch.tanh(self.pooler.dense(x))  # (B, d)
        return self.classifier(self.dropout(pooled))  # (B, num_labels)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under BertForSequenceClassification's names."""
        sd = {}
        for k, v in self.state_dict().items():
            sd["bert.pooler." + k[len("pooler."):] if k.startswith("pooler.") else k] = v.contiguous()
        return sd


class GlueModel:
    """Tokenizer + ElasticClassifier + Submap of one model directory.

    Args:
        model_dir: a BERT-family checkpoint directory (config.json, model.safetensors,
            tokenizer), optionally with submap.json; without one it has one level, 100.
        task: the task the model must answer; a checkpoint whose config gives another number of
            labels is refused. A checkpoint without a classifier (a pretrained LM) gets a new
            one, initialised from ``seed``.
        dropout: see ElasticClassifier.
        pooling: the pooling of a new classifier ("cls" or "mean"); a checkpoint with a classifier
            keeps the one its config.json names (``classifier_pooling``, absent = "cls").

    Raises:
        FileNotFoundError: config.json or model.safetensors is missing.
        ValueError: the checkpoint's number of labels differs from the task's (message names the
            directory, both numbers and the task), the weights do not fit submap.json, or the
            pooling is not "cls" or "mean" (naming the directory).
    """

    def __init__(self, model_dir: str | Path, task: GlueTask, dropout: float = 0.1, seed: int = 0,
                 pooling: str = "cls"):
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        self.model_dir = d = Path(model_dir)
        self.task = task
        for f in ("config.json", "model.safetensors"):
            if not (d / f).exists():
                raise FileNotFoundError(f"{d}: {f} is missing (not a BERT-family model directory)")
        config = json.loads((d / "config.json").read_text())
        self.dims = BertDims.from_config_file(d / "config.json")
        raw = load_file(str(d / "model.safetensors"))
        has_head = "classifier.weight" in raw
        n = config_num_labels(config) if has_head else None
        if has_head and n is None:
            n = raw["classifier.weight"].shape[0]
        if n is not None and n != task.num_labels:
            raise ValueError(f"{d}: the checkpoint has {n} labels, task {task.name} needs {task.num_labels}")
        self.submap = (Submap.load(d / "submap.json", self.dims) if (d / "submap.json").exists()
                       else Submap({100: self.dims.full()}, "cls", False))
        pooling = config.get("classifier_pooling", "cls") if has_head else pooling
        if pooling not in POOLINGS:
            raise ValueError(f"{d}: classifier_pooling must be one of {POOLINGS}, got {pooling!r}")
        torch.manual_seed(seed)
        self.model = ElasticClassifier(self.dims, self.submap.levels[self.submap.largest], task.num_labels, dropout,
                                       pooling)
        try:
            load_state(d / "model.safetensors", self.model.bert, raw)
        except ValueError as e:
            raise ValueError(f"{d}: the weights do not match the stored layout: {e}") from None
        with torch.no_grad():
            for name, dst in (("bert.pooler.dense", self.model.pooler.dense), ("pooler.dense", self.model.pooler.dense),
                              ("classifier", self.model.classifier)):
                if f"{name}.weight" in raw:
                    dst.weight.copy_(raw[f"{name}.weight"])
                    dst.bias.copy_(raw[f"{name}.bias"])
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(d))

    @property
    def levels(self) -> list[int]:
        """Preserving levels in percent, largest first."""
        return list(self.submap.levels)

    def sublm(self, level: int) -> SubLM:
        return self.submap.sublm(level)

    def tokenize(self, text_a: list[str], text_b: list[str] | None) -> dict[str, list[list[int]]]:
        """Unpadded token ids (and segment ids) of examples, truncated to the task's max_length."""
        return self.tokenizer(text_a, text_b, truncation=True, max_length=self.task.max_length)

    def collate(self, enc: dict[str, list[list[int]]], idx: list[int]) -> dict[str, torch.Tensor]:
        """Pad examples ``idx`` of ``tokenize``'s output into (B, T) tensors."""
        feats = [{k: enc[k][i] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc} for i in idx]
        return dict(self.tokenizer.pad(feats, return_tensors="pt"))

    def logits(self, batch: dict[str, torch.Tensor], level: int) -> torch.Tensor:
        """(B, num_labels) logits of the SubLM at ``level`` (grad follows torch's grad mode)."""
        return self.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), sublm=self.sublm(level))

    @torch.inference_mode()
    def predict_logits(self, text_a: list[str], text_b: list[str] | None, level: int, batch_size: int = 64) -> torch.Tensor:
        """(N, num_labels) logits in input order; batches are length-sorted."""
        self.model.eval()
        enc = self.tokenize(text_a, text_b)
        order = sorted(range(len(text_a)), key=lambda i: len(enc["input_ids"][i]))
        out = torch.empty(len(text_a), self.task.num_labels)
        device = next(self.model.parameters()).device
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = {k: v.to(device) for k, v in self.collate(enc, idx).items()}
            out[idx] = self.logits(batch, level).float().cpu()
        return out

    def save(self, out: str | Path, model: ElasticClassifier | None = None, submap: Submap | None = None) -> None:
        """Write a BertForSequenceClassification-style directory: config.json (with num_labels,
        id2label, problem_type, classifier_pooling), model.safetensors, submap.json, tokenizer
        files. transformers' BertForSequenceClassification always pools [CLS]: it reads a
        "mean" model's weights but not its pooling."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model = model or self.model
        save_file(model.hf_state_dict(), str(out / "model.safetensors"))
        (submap or self.submap).save(out / "submap.json", self.dims)
        config = json.loads((self.model_dir / "config.json").read_text())
        t = self.task
        config.update({"architectures": ["BertForSequenceClassification"], "num_labels": t.num_labels,
                       "id2label": {str(i): n for i, n in enumerate(t.class_names)},
                       "label2id": {n: i for i, n in enumerate(t.class_names)},
                       "problem_type": "regression" if t.regression else "single_label_classification",
                       "finetuning_task": t.name, "classifier_pooling": model.pooling})
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        self.tokenizer.save_pretrained(str(out))

    def cut(self, level: int, out: str | Path) -> None:
        """Write a one-level directory holding SubLM ``level`` physically pruned (a static model)."""
        sub = self.sublm(level)
        self.save_encoder(prune(self.model.bert, sub), Submap({level: sub}, "cls", False), out)

    def save_encoder(self, bert: ElasticBert, submap: Submap, out: str | Path) -> None:
        """Write a model directory with encoder ``bert`` (its stored layout must be submap's
        largest SubLM), this model's pooler and classifier, and ``submap``: how a cut-out static
        level and a model pruned by expressive scores (training/ranker.py) are saved."""
        if bert.layout != submap.levels[submap.largest]:
            raise ValueError(f"save_encoder: the encoder's layout {bert.layout} is not the submap's largest SubLM")
        m = ElasticClassifier(self.dims, bert.layout, self.task.num_labels, pooling=self.model.pooling)
        m.bert = bert
        m.pooler.load_state_dict(self.model.pooler.state_dict())
        m.classifier.load_state_dict(self.model.classifier.state_dict())
        self.save(out, m, submap)
