"""FT-M: fine-tuning with the cross-entropy loss masked to the target tokens (EasyEdit's FT-M).

Reference: EasyEdit (zjunlp/EasyEdit, easyeditor/models/ft/ft_main.py) with
`objective_optimization: "target_new"`, the variant the EasyEdit survey (Zhang et al. 2024,
"A Comprehensive Study of Knowledge Editing for LLMs") calls FT-M. For prompt p and target tokens
o_1..o_J the loss of one request is the teacher-forced token cross-entropy over the target only:

    L = -(1/J) Σ_j log P(o_j | p, o_<j)        (prompt positions carry no loss)

averaged over the requests of a batch. Adam (`lr`, `weight_decay`) updates only the MLP output
projection of each layer in `layers` (GPT-2 `mlp.c_proj` weight and bias, as EasyEdit's
`rewrite_module_tmp` "transformer.h.{}.mlp.c_proj" matches both; Llama `mlp.down_proj.weight`).
Per epoch (`num_steps` epochs) the requests are walked in chunks of `batch_size`; a chunk whose
loss is below `early_stop_loss` (EasyEdit: 1e-2, hard-coded) takes no step, and the epoch loop stops
once the epoch's mean loss is below it. If `norm_constraint` is a number, each weight is projected
into the L∞ ball of that radius around its original value after every chunk; `false` (EasyEdit's
FT-M configs) leaves it free.

Differences from EasyEdit, deliberate:
- Prompts are tokenised once with the target appended token-wise (prompt ids + " target" ids),
  right padded, so the label mask is exact for every row. EasyEdit tokenises the concatenated
  string and derives the mask from pad counts, which is exact only for left padding or batch 1.
- The loss is read only at the target-predicting positions (same value as masking the full
  sequence's cross-entropy).
- `ft-l` (editors/ft.py) shares this loop but scores every target token at the last prompt position
  (ROME's and EasyEdit's "prompt_last") and, as ROME's configs, bounds the change (L∞) by default.
"""

from __future__ import annotations

from editors.ft import FineTuneBase, FineTuneMHparams, target_nll


class FineTuneM(FineTuneBase, hparams=FineTuneMHparams):
    """FT-M (EasyEdit): fine-tune one MLP output projection, loss on the target tokens only."""

    loss_fn = staticmethod(target_nll)
    hp: FineTuneMHparams
