"""Findings decoder of MedFusion: an LSTM with attention over image regions.

The generation branch of arXiv 2405.17459 (clinical description generation, scored by BLEU and
ROUGE-L). Luong-style attention: the LSTM reads <bos> w1 w2 ... with the fused vector appended to
every input (and initializing its state); each output state then attends over the image regions,
and [state; context] predicts the next word. Because attention comes after the recurrence,
teacher-forced training runs the LSTM over the whole sequence in one call.

Each region arrives with its cell's (x, y) appended (`medfusion.models.decoder_regions`), so the
context carries where the decoder looked as two plain numbers: words of place ("left", "upper
zone") read them directly instead of recovering a position from features that the classifier and
the box head have shaped for what a region shows. A cell is coarse for a zone a third of a lung high,
so the model also appends to the fused vector where its box head found the lesion
(`medfusion.models.place_features`): the decoder's context vector is that pair.

Inference: `greedy` and a batched `beam_search` (all images x beams advance together as one
(B*K)-row batch). Both return (B, max_len) ids without <bos>; a sequence ends with <eos> and is
<pad>ded after it, or is cut at max_len without <eos>.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3  # medfusion.data.tokenizer ids

State = tuple[Tensor, Tensor]


class FindingsDecoder(nn.Module):
    """Args:
    vocab_size: tokenizer vocabulary size.
    embed_dim: word embedding size.
    hidden_dim: LSTM hidden size.
    context_dim: width of the context vector read at every step and initializing the state (the
        model gives the fused vector with its box's `place_features`).
    dropout: dropout before the output projection.
    region_dim: width of the regions it attends over (default D: no position appended; the model
        gives D + 2, each region with its cell's (x, y)).
    """

    def __init__(
        self,
        vocab_size: int,
        embed_dim: int,
        hidden_dim: int,
        context_dim: int,
        dropout: float = 0.0,
        region_dim: int | None = None,
    ) -> None:
        super().__init__()
        region_dim = region_dim or context_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.init_state = nn.Linear(context_dim, 2 * hidden_dim)
        self.lstm = nn.LSTM(embed_dim + context_dim, hidden_dim, batch_first=True)
        self.query = nn.Linear(hidden_dim, region_dim)
        self.combine = nn.Linear(hidden_dim + region_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)
        self.scale = region_dim**-0.5

    def initial_state(self, fused: Tensor) -> State:
        h0, c0 = torch.tanh(self.init_state(fused)).chunk(2, dim=-1)  # (B, H) each
        return h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()  # (1, B, H) each

    def step(self, tokens: Tensor, state: State, regions: Tensor, fused: Tensor) -> tuple[Tensor, Tensor, State]:
        """Advance over `tokens` (B, T) attending over `regions` (B, R, region_dim): logits (B, T, V),
        region attention (B, T, R), new state."""
        steps = tokens.shape[1]
        inputs = torch.cat([self.embed(tokens), fused.unsqueeze(1).expand(-1, steps, -1)], dim=-1)  # (B, T, E+D)
        outputs, state = self.lstm(inputs, state)  # (B, T, H)
        scores = torch.bmm(self.query(outputs), regions.transpose(1, 2)) * self.scale  # (B, T, R)
        attention = scores.softmax(dim=-1)
        context = torch.bmm(attention, regions)  # (B, T, D)
        hidden = torch.tanh(self.combine(torch.cat([outputs, context], dim=-1)))  # (B, T, H)
        return self.out(self.dropout(hidden)), attention, state  # (B, T, V)

    def forward(self, findings_ids: Tensor, regions: Tensor, fused: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing on <bos> w1 .. wn <eos>: logits (B, T-1, V) for w1 .. <eos>, attention (B, T-1, R)."""
        logits, attention, _ = self.step(findings_ids[:, :-1], self.initial_state(fused), regions, fused)
        return logits, attention

    @torch.no_grad()
    def greedy(self, regions: Tensor, fused: Tensor, max_len: int, early_exit: bool = True) -> Tensor:
        """Most likely word at each step: (B, max_len) ids.

        `early_exit=False` runs all max_len steps even when every row has ended: under ZeRO-3 each
        step gathers parameters collectively, so all ranks must take the same number of steps.
        """
        batch = fused.shape[0]
        state = self.initial_state(fused)
        tokens = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=fused.device)
        out = torch.full((batch, max_len), PAD_ID, dtype=torch.long, device=fused.device)
        finished = torch.zeros(batch, dtype=torch.bool, device=fused.device)
        for t in range(max_len):
            logits, _, state = self.step(tokens, state, regions, fused)
            next_token = logits[:, -1].argmax(dim=-1).masked_fill(finished, PAD_ID)  # (B,)
            out[:, t] = next_token
            finished |= next_token == EOS_ID
            if early_exit and bool(finished.all()):
                break
            tokens = next_token.unsqueeze(1)
        return out

    @torch.no_grad()
    def beam_search(self, regions: Tensor, fused: Tensor, beam_size: int, max_len: int) -> Tensor:
        """Batched beam search: (B, max_len) ids of the best beam by length-normalized log-probability.

        Finished beams stay in the beam with a frozen score (they can only emit <pad>); the final
        choice divides each beam's score by its length so that short outputs are not favoured.
        """
        if beam_size == 1:
            return self.greedy(regions, fused, max_len)
        batch, k, device = fused.shape[0], beam_size, fused.device
        regions = regions.repeat_interleave(k, dim=0)  # (B*K, R, D)
        fused = fused.repeat_interleave(k, dim=0)  # (B*K, D)
        state = self.initial_state(fused)
        scores = torch.full((batch, k), float("-inf"), device=device)
        scores[:, 0] = 0.0  # all beams start identical: expand only the first
        out = torch.full((batch * k, max_len), PAD_ID, dtype=torch.long, device=device)
        tokens = torch.full((batch * k, 1), BOS_ID, dtype=torch.long, device=device)
        finished = torch.zeros(batch * k, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch * k, device=device)
        for t in range(max_len):
            logits, _, state = self.step(tokens, state, regions, fused)
            log_probs = logits[:, -1].float().log_softmax(dim=-1)  # (B*K, V)
            vocab = log_probs.shape[-1]
            frozen = torch.full_like(log_probs, float("-inf"))
            frozen[:, PAD_ID] = 0.0
            log_probs = torch.where(finished.unsqueeze(-1), frozen, log_probs)
            candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, k * vocab)  # (B, K*V)
            scores, index = candidates.topk(k, dim=-1)  # (B, K)
            source = (index // vocab + torch.arange(batch, device=device).unsqueeze(1) * k).reshape(-1)  # (B*K,)
            next_token = (index % vocab).reshape(-1)  # (B*K,)
            out = out[source]
            out[:, t] = next_token
            state = (state[0][:, source], state[1][:, source])
            lengths = lengths[source] + (~finished[source]).float()
            finished = finished[source] | (next_token == EOS_ID)
            if bool(finished.all()):
                break
            tokens = next_token.unsqueeze(1)
        best = (scores / lengths.reshape(batch, k).clamp(min=1.0)).argmax(dim=-1)  # (B,)
        return out.reshape(batch, k, max_len)[torch.arange(batch, device=device), best]
