"""RoFormer encoder computed as Hugging Face ``RoFormerModel`` computes it, with attention behind one seam.

Parameter names equal Hugging Face's (``embeddings.word_embeddings.weight``,
``encoder.layer.3.attention.self.query.weight``, ...), so a state dict moves across with only the
fixed sinusoidal table ``encoder.embed_positions.weight`` added or removed (see ``af_train.model.hf``).

Maths per layer (post-LN): ``h = LN(h + Dropout(W_o · Attn(RoPE(W_q h), RoPE(W_k h), W_v h)))``, then
``h = LN(h + Dropout(W_2 · act(W_1 h)))``, where ``Attn = Dropout_a(softmax(q k^T / sqrt(d))) v``.
Attention is ``kernels.dispatch.rotary_attention``: SDPA on the reference path, the Triton kernel on
GPU. ``Dropout_a`` (``attention_probs_dropout_prob``, training mode only) happens inside it: SDPA's own
dropout (on CPU in fp32 the reference's own attention with a 31-bit integer mask, cheaper than SDPA's
unfused fallback), or the kernel's in-register Philox mask; all draw from torch's default generator, so
activation checkpointing replays the same masks (it restores the RNG state) and eval mode is exact.

Padding: padded keys are never attended. Padded query positions still produce hidden states (they
attend to the real tokens, exactly as in Hugging Face); they carry no meaning and every head/pooler
in af_train ignores them through the attention mask.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from af_train.model.config import AudioFormerConfig
from kernels import dispatch
from kernels.reference import rotary_tables

__all__ = ["RoFormerEncoder", "activation_fn", "init_weights"]


def activation_fn(name: str):
    """The activation called ``name`` in Hugging Face's ACT2FN (the subset we support)."""
    if name == "gelu":
        return F.gelu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "relu":
        return F.relu
    if name == "silu":
        return F.silu
    raise ValueError(f"unsupported activation '{name}'")


def init_weights(module: nn.Module, std: float) -> None:
    """Hugging Face's BERT/RoFormer initialisation: N(0, std) weights, zero biases, zero padding row."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class RoFormerEmbeddings(nn.Module):
    """Word + token-type embeddings, LayerNorm, dropout (no absolute positions: RoPE carries them)."""

    def __init__(self, config: AudioFormerConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        words = self.word_embeddings(input_ids)
        if token_type_ids is None:
            # type 0 for every token, looked up once and broadcast (through the module, so that ZeRO-3
            # gathers the table)
            types = self.token_type_embeddings(input_ids.new_zeros(1))
        else:
            types = self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(words + types))


class RoFormerSelfAttention(nn.Module):
    def __init__(self, config: AudioFormerConfig, kernels: str = "auto") -> None:
        super().__init__()
        self.kernels = dispatch.check_backend(kernels)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.dropout_prob = config.attention_probs_dropout_prob
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch, seq, width = hidden.shape
        shape = (batch, seq, self.num_heads, self.head_dim)
        q = self.query(hidden).view(shape)
        k = self.key(hidden).view(shape)
        v = self.value(hidden).view(shape)
        dropout_p = self.dropout_prob if self.training else 0.0
        context = dispatch.rotary_attention(q, k, v, cos, sin, attention_mask, interleaved=True, dropout_p=dropout_p,
                                            backend=self.kernels)
        return context.reshape(batch, seq, width)


class RoFormerSelfOutput(nn.Module):
    def __init__(self, config: AudioFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class RoFormerAttention(nn.Module):
    def __init__(self, config: AudioFormerConfig, kernels: str = "auto") -> None:
        super().__init__()
        self.self = RoFormerSelfAttention(config, kernels)
        self.output = RoFormerSelfOutput(config)

    def forward(self, hidden, cos, sin, attention_mask):
        return self.output(self.self(hidden, cos, sin, attention_mask), hidden)


class RoFormerIntermediate(nn.Module):
    def __init__(self, config: AudioFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = activation_fn(config.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(hidden))


class RoFormerOutput(nn.Module):
    def __init__(self, config: AudioFormerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, intermediate: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(intermediate)) + residual)


class RoFormerLayer(nn.Module):
    def __init__(self, config: AudioFormerConfig, kernels: str = "auto") -> None:
        super().__init__()
        self.attention = RoFormerAttention(config, kernels)
        self.intermediate = RoFormerIntermediate(config)
        self.output = RoFormerOutput(config)

    def forward(self, hidden, cos, sin, attention_mask):
        attended = self.attention(hidden, cos, sin, attention_mask)
        return self.output(self.intermediate(attended), attended)


class RoFormerLayers(nn.Module):
    """Holds ``layer`` so that parameter names read ``encoder.layer.N...`` as in Hugging Face."""

    def __init__(self, config: AudioFormerConfig, kernels: str = "auto") -> None:
        super().__init__()
        self.layer = nn.ModuleList(RoFormerLayer(config, kernels) for _ in range(config.num_hidden_layers))


class RoFormerEncoder(nn.Module):
    """``forward(input_ids [B, T], attention_mask [B, T]) -> hidden states [B, T, hidden]``.

    ``kernels``: the attention backend, ``auto`` | ``triton`` | ``reference`` (the recipe's
    ``model.kernels``; see ``kernels.dispatch``). A run-time choice, not part of the weights' config.
    """

    _MAX_CACHED_TABLES = 64  # dynamic padding gives one length per multiple of 8

    def __init__(self, config: AudioFormerConfig, kernels: str = "auto") -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.embeddings = RoFormerEmbeddings(config)
        self.encoder = RoFormerLayers(config, kernels)
        self._kernels = dispatch.check_backend(kernels)
        # (seq_len, device) -> (cos, sin), float32, shared by all layers; rebuilt only for a new length
        # or device. A plain dict, not buffers: the tables are a pure function of the config.
        self._rotary_cache: OrderedDict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        init_weights(self, config.initializer_range)

    @property
    def kernels(self) -> str:
        """The attention backend of every layer (settable: e.g. to compare the Triton and reference paths)."""
        return self._kernels

    @kernels.setter
    def kernels(self, name: str) -> None:
        self._kernels = dispatch.check_backend(name)
        for layer in self.encoder.layer:
            layer.attention.self.kernels = self._kernels

    @property
    def activation_checkpointing(self) -> bool:
        return self.config.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        self.config.activation_checkpointing = bool(enabled)

    def rotary_tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [seq_len, head_dim // 2] for this device, built once and cached."""
        key = (seq_len, str(device))
        tables = self._rotary_cache.get(key)
        if tables is None:
            tables = rotary_tables(seq_len, self.config.head_dim, self.config.rotary_base, device=device)
            self._rotary_cache[key] = tables
            while len(self._rotary_cache) > self._MAX_CACHED_TABLES:
                self._rotary_cache.popitem(last=False)
        else:
            self._rotary_cache.move_to_end(key)
        return tables

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        embedding_mix: Callable[[torch.Tensor], torch.Tensor] | None = None,
        output_hidden_states: bool = False,
    ) -> torch.Tensor | list[torch.Tensor]:
        """``embedding_mix``: applied to the embedding layer's output (mixup, ``af_train.augment``).

        ``output_hidden_states``: return every hidden state instead of the last, as a list of
        ``num_hidden_layers + 1`` tensors [B, T, hidden]: the embedding layer's output (0), then each
        layer's (frozen-embedding probes and ``af-embed --layer`` read them)."""
        if input_ids.dim() != 2:
            raise ValueError(f"RoFormerEncoder expects input_ids [batch, seq], got shape {tuple(input_ids.shape)}")
        batch, seq = input_ids.shape
        if seq > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq} exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                "shorten data.max_length or raise model.max_position_embeddings"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(
                f"attention_mask must have the shape of input_ids {[batch, seq]}, got {list(attention_mask.shape)}"
            )
        if token_type_ids is not None and tuple(token_type_ids.shape) != (batch, seq):
            raise ValueError(
                f"token_type_ids must have the shape of input_ids {[batch, seq]}, got {list(token_type_ids.shape)}"
            )
        cos, sin = self.rotary_tables(seq, input_ids.device)
        hidden = self.embeddings(input_ids, token_type_ids)
        if embedding_mix is not None:
            hidden = embedding_mix(hidden)
        use_checkpoint = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        states = [hidden] if output_hidden_states else None
        for layer in self.encoder.layer:
            if use_checkpoint:
                hidden = checkpoint(layer, hidden, cos, sin, attention_mask, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, attention_mask)
            if states is not None:
                states.append(hidden)
        return states if states is not None else hidden

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
