"""Recovery by distillation (``trainer.recovery.distill``): the pruned model learns the dense
model's output distribution besides the task's labels, as Minitron and Sheared-LLaMA recover
pruned models.

The teacher is the model as it was just before pruning, phase I's adapters included: its state
is written at the prune step (``<run>/teacher``, adapters only) so that a resumed recovery has the
same teacher. It is rebuilt from the pretrained weights plus that state, then shares every frozen
tensor the student still holds unchanged (same name, shape and values): after unstructured
pruning by |ΔW| that is all of W (the masks live beside it), after structured pruning or OBS none
of the shrunk or rewritten matrices. ``teacher_extra_bytes`` in metrics.json is what it adds.

Loss per target (a token of a causal LM, an example of a classifier):
``CE(student, label) + distill_weight · T² · KL(softmax(teacher / T) ‖ softmax(student / T))``;
the T² keeps the KL term's gradient scale independent of the temperature (Hinton et al.).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from dsee_cli.data.generation import LOSS_CHUNK, _targets_and_hidden


def kl_sum(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ over rows of T² · KL(softmax(teacher / T) ‖ softmax(student / T)), in fp32."""
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    s = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="sum") * temperature**2


def _chunk(head: nn.Module, teacher_head: nn.Module, h: torch.Tensor, th: torch.Tensor, targets: torch.Tensor,
           smoothing: float, weight: float, temperature: float) -> torch.Tensor:
    logits = head(h).float()
    with torch.no_grad():
        teacher_logits = teacher_head(th).float()
    ce = F.cross_entropy(logits, targets, reduction="sum", label_smoothing=smoothing)
    return ce + weight * kl_sum(logits, teacher_logits, temperature)


def distill_lm_loss(model: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float,
                    weight: float, temperature: float, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """The causal LM's loss (lm_loss's: target tokens only, the LM head a chunk at a time) plus the
    KL term to the teacher's next-token distribution on the same tokens."""
    hidden, targets = _targets_and_hidden(model, batch)
    if not len(targets):
        return hidden.sum() * 0.0
    with torch.no_grad():
        teacher_hidden, _ = _targets_and_hidden(teacher, batch)
    head, teacher_head = model.get_output_embeddings(), teacher.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        part = (hidden[start:start + chunk], teacher_hidden[start:start + chunk], targets[start:start + chunk])
        args = (head, teacher_head, *part, label_smoothing, weight, temperature)
        total = total + (checkpoint(_chunk, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk(*args))
    return total / len(targets)


def distill_logits_loss(model: nn.Module, teacher: nn.Module, batch: dict[str, torch.Tensor], weight: float,
                        temperature: float) -> torch.Tensor:
    """A classifier's loss (the model's own) plus the KL term to the teacher's class distribution."""
    out = model(**batch)
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return out.loss + weight * kl_sum(out.logits, teacher_logits, temperature) / out.logits.shape[0]


@torch.no_grad()
def share_frozen(teacher: nn.Module, student: nn.Module) -> tuple[int, int]:
    """Point the teacher's frozen tensors at the student's where the student still holds them
    unchanged (same name, shape, dtype and values). Returns (bytes shared, bytes the teacher adds)."""
    theirs = dict(student.named_parameters())
    shared = extra = 0
    for name, p in list(teacher.named_parameters()):
        mine = theirs.get(name)
        size = p.numel() * p.element_size()
        if mine is not None and not mine.requires_grad and mine.shape == p.shape and mine.dtype == p.dtype \
                and torch.equal(mine.detach().to(p.device), p.detach()):
            owner, _, attr = name.rpartition(".")
            setattr(teacher.get_submodule(owner), attr, mine)
            shared += size
        else:
            extra += size
        p.requires_grad_(False)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return shared, extra
