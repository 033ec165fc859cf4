"""The training objectives over shared forward passes.

settings       the objectives' shared settings (PseudoGumbelConfig, `objective:` in a config)
passes         the student passes and losses every objective runs (caption logits, segmentation
               from caption embeddings, mask loss and IoU, caption tokenisation)
teacher        teacher captions (Pseudo-Gumbel step 1)
pseudo_gumbel  Pseudo-Gumbel V2, SPEC §3's six steps in order
supervised     ground-truth text: caption cross-entropy + referring segmentation
mix            which objective a step trains (mixed; two streams, whose schedules make the curriculum)
"""
