"""Small random Geneformer-style models, vocabularies and tokenized cells for the perturbation tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class MiniVocab:
    """Just the GeneformerVocab attributes the perturbation code reads."""

    version: str
    n_genes: int
    max_length: int
    pad_id: int = 0
    mask_id: int = 1
    cls_id: int | None = None
    eos_id: int | None = None
    token_ids: dict = field(default_factory=dict)
    mapping: dict = field(default_factory=dict)
    id_to_token: list = field(default_factory=list)

    @classmethod
    def make(cls, version: str, n_genes: int, max_length: int) -> MiniVocab:
        specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if version == "V2" else [])
        names = specials + [f"ENSG{i:011d}" for i in range(n_genes)]
        v = cls(version=version, n_genes=n_genes, max_length=max_length)
        if version == "V2":
            v.cls_id, v.eos_id = 2, 3
        v.id_to_token = names
        v.token_ids = {n: i for i, n in enumerate(names)}
        v.mapping = {f"GENE{i}": f"ENSG{i:011d}" for i in range(n_genes)}
        return v

    @property
    def special_ids(self) -> list[int]:
        return [i for i in (self.pad_id, self.mask_id, self.cls_id, self.eos_id) if i is not None]

    @property
    def first_gene_id(self) -> int:
        return len(self.special_ids)

    def __len__(self) -> int:
        return len(self.id_to_token)


@dataclass
class MiniTokens:
    """TokenizedCells-like container (same attribute names)."""

    input_ids: list
    vocab: MiniVocab
    var_token_ids: np.ndarray
    obs_names: np.ndarray
    genes: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.input_ids])

    @property
    def empty(self) -> np.ndarray:
        return self.lengths == 0

    def token_to_var(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for pos, t in enumerate(self.var_token_ids):
            if t >= 0:
                out.setdefault(int(t), pos)
        return out

    def __len__(self) -> int:
        return len(self.input_ids)


def make_model(
    vocab: MiniVocab, *, n_layers: int = 3, hidden: int = 32, heads: int = 4, seed: int = 0, init: float = 0.3
):
    """A random BertForMaskedLM with weights large enough for clearly non-zero shifts."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=vocab.max_length,
        hidden_act="relu",
        pad_token_id=0,
        initializer_range=init,
        attn_implementation="sdpa",
    )
    return transformers.BertForMaskedLM(cfg).eval()


def make_cells(vocab: MiniVocab, lengths, *, gene: int | None, gene_pos, seed: int = 0) -> list[np.ndarray]:
    """Cells with the given numbers of gene tokens (unique, random); ``gene`` put at ``gene_pos[i]``
    (an index, "last", or None for absent)."""
    rng = np.random.default_rng(seed)
    first = vocab.first_gene_id
    pool = np.arange(first, len(vocab))
    if gene is not None:
        pool = pool[pool != gene]
    cells = []
    for n, gp in zip(lengths, gene_pos, strict=True):
        genes = rng.choice(pool, size=n, replace=False)
        if gp is not None and gene is not None:
            idx = n - 1 if gp == "last" else gp
            genes[idx] = gene
        if vocab.cls_id is not None:
            genes = np.concatenate([[vocab.cls_id], genes, [vocab.eos_id]])
        cells.append(genes.astype(np.int64))
    return cells


def make_adata(vocab: MiniVocab, cells: list[np.ndarray], *, n_extra_vars: int = 3, seed: int = 0):
    """AnnData whose var are the vocabulary genes (plus a few not in the vocabulary) and tokens for it."""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    first = vocab.first_gene_id
    gene_tokens = np.arange(first, len(vocab))
    rng.shuffle(gene_tokens)  # var order != token order
    var_tokens = np.concatenate([gene_tokens, np.full(n_extra_vars, -1)])
    var_names = [vocab.id_to_token[t] for t in gene_tokens] + [f"NOTINVOCAB{i}" for i in range(n_extra_vars)]
    x = sp.random(len(cells), len(var_names), density=0.2, format="csr", random_state=seed, dtype=np.float32)
    adata = ad.AnnData(X=x)
    adata.var_names = var_names
    adata.var["gene_symbol"] = [f"GENE{t - first}" if t >= 0 else "X" for t in var_tokens]
    adata.obs_names = [f"cell{i}" for i in range(len(cells))]
    tokens = MiniTokens(
        input_ids=list(cells),
        vocab=vocab,
        var_token_ids=var_tokens.astype(np.int64),
        obs_names=np.asarray(adata.obs_names),
        genes=np.asarray(var_names),
    )
    return adata, tokens
