"""HaDis (Zhang & Huang, arXiv 2401.14038): hardness-aware deep clustering by self-distillation.

HaDis trains the BYOL-style online/target pair of ``byol_target`` with the k-means E-step
of ``kmeans_e_step`` (pseudo-labels every epoch; the final clustering is the same k-means)
and three loss terms:

    L = L_DSA + L_HSD + lambda * [epoch > warm-up] * L_PCL

* DSA, diffused sampling alignment: align the predictor output of a diffused online
  sample, p(q + sigma*eps), with the target k.  It is ProPos's PSA and DigPro's L_base,
  served by ProPos's ``diffused_sampling`` plugin (sigma = 0.001, 0 during warm-up).
* HSD, hardness-aware self-distillation: the only new term, and the only plugin in this
  folder, ``hardness_aware_distillation``.  The target's normalised outputs are the
  teacher, the diffused online predictions the student; per anchor the hardest negative
  and the hardest positive are mined from teacher-student distances and weighted by how
  much the student contradicts the teacher (tau = 0.5, weight 1, no warm-up gate).
* PCL, prototype contrastive learning: contrast batch prototypes of the two views over the
  pseudo-label clusters.  It is ProPos's PSL and DigPro's prototype aggregation, served by
  ProPos's ``prototype_aggregation`` plugin (lambda = 0.1; 0.05 on ImageNet-10; 0 until
  the warm-up ends).

DSA and PCL are reused, not copied.  A HaDis recipe therefore lists::

    plugins:
      byol_target:                  {momentum: 0.996}
      kmeans_e_step:                {}
      diffused_sampling:            {sigma: 0.001}                       # DSA
      hardness_aware_distillation:  {temperature: 0.5, sigma: 0.001}     # HSD
      prototype_aggregation:        {temperature: 0.5, weight: 0.1}      # PCL

and is ProPos's recipe plus ``hardness_aware_distillation``: without it, it is ProPos.
"""
