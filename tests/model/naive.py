"""Test-side reference: the multi-token loss with every head's logits materialised and one backward."""

import torch
import torch.nn.functional as F


def naive_multi_token_loss(model, tokens, labels, loss_mask=None):
    """Sum over heads k of mean_t CE(logits_k[t], labels[t + k]) weighted by loss_mask[t + k].

    Returns (loss, head_losses (n,)); every head's full (B, T, V) logits exist at once."""
    logits = model.logits(tokens)  # (n, B, T, V)
    seq = tokens.shape[1]
    if loss_mask is None:
        loss_mask = torch.ones(labels.shape)
    losses = []
    for k in range(logits.shape[0]):
        ce = F.cross_entropy(logits[k, :, : seq - k].flatten(0, 1).float(), labels[:, k:].flatten(),
                             reduction="none")
        mask = loss_mask[:, k:].flatten().float()
        losses.append((ce * mask).sum() / mask.sum().clamp_min(1e-12))
    losses = torch.stack(losses)
    return losses.sum(), losses.detach()
