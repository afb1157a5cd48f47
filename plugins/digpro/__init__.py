"""DigPro (Zhang & Huang, arXiv 2401.13581): dynamic grouping + prototype aggregation.

DigPro = ``momentum_grouping`` + ``prototype_aggregation`` + ``diffused_sampling``,
over the BYOL-style pair of ``byol_target`` and the k-means E-step of ``kmeans_e_step``.

Only ``momentum_grouping`` (the dynamic grouping of the paper, Eq. 3-6) lives here.
The other two terms coincide with ProPos's losses and are ProPos's plugins, reused
rather than copied: ``diffused_sampling`` is DigPro's L_base (Eq. 2) and
``prototype_aggregation`` is DigPro's prototype aggregation (Eq. 7-9).  A DigPro
recipe therefore lists::

    plugins:
      byol_target:           {momentum: 0.996}
      kmeans_e_step:         {}
      diffused_sampling:     {sigma: 0.001}                 # L_base, Eq. 2
      prototype_aggregation: {temperature: 0.5, weight: 0.1}  # Eq. 7-9
      momentum_grouping:     {beta: 0.99, temperature: 0.1, weight: 0.3}  # Eq. 3-6

and the paper's ablation is the same recipe without ``momentum_grouping`` and/or
``prototype_aggregation``.
"""
