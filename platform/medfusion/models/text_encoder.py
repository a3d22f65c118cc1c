"""Clinical-note encoder of MedFusion: embedding -> bidirectional LSTM -> additive attention.

The text branch of arXiv 2405.17459. The note is optional (a new study has none yet, and training
drops it on purpose), so an absent note - an all-<pad> row - is encoded as a learned "no note" vector
with all-zero token weights, never as an attention over nothing (which would be NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from medfusion.models.image_encoder import AdditiveAttentionPool

PAD_ID = 0  # medfusion.data.tokenizer.PAD_ID; repeated so the model imports with torch alone


@dataclass
class NoteFeatures:
    states: Tensor
    """(B, T, D) per-token features (zeros at padding)."""
    mask: Tensor
    """(B, T) bool, True at real tokens."""
    vector: Tensor
    """(B, D) attention-pooled note, or the learned no-note vector where `present` is False."""
    weights: Tensor
    """(B, T) token attention weights (sum to 1 for a present note, all zero otherwise)."""
    present: Tensor
    """(B,) bool, the note has at least one token."""


class NoteEncoder(nn.Module):
    """Token ids (B, T), <pad>=0, right-padded -> NoteFeatures.

    Args:
        vocab_size: tokenizer vocabulary size.
        embed_dim: token embedding size.
        hidden_dim: LSTM hidden size per direction.
        out_dim: width D of the token features and the note vector.
        dropout: dropout on embeddings and LSTM outputs.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.state_proj = nn.Linear(2 * hidden_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.pool = AdditiveAttentionPool(out_dim)
        self.no_note = nn.Parameter(torch.zeros(out_dim))

    def forward(self, token_ids: Tensor) -> NoteFeatures:
        batch, steps = token_ids.shape
        mask = token_ids != PAD_ID  # (B, T)
        present = mask.any(dim=1)  # (B,)
        # Packing skips the padding, so a short note is not read through dozens of <pad> steps by the
        # backward direction. Empty rows are packed with length 1 and their output is discarded.
        lengths = mask.sum(dim=1).clamp(min=1).cpu()
        embedded = self.dropout(self.embed(token_ids))  # (B, T, E)
        packed = pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        outputs, _ = self.lstm(packed)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=steps)  # (B, T, 2H)
        states = torch.tanh(self.state_proj(self.dropout(outputs))) * mask.unsqueeze(-1)  # (B, T, D)
        pooled, weights = self.pool(states, mask)  # (B, D), (B, T)
        vector = torch.where(present.unsqueeze(-1), pooled, self.no_note.to(pooled.dtype).expand(batch, -1))
        return NoteFeatures(states=states, mask=mask, vector=vector, weights=weights, present=present)
