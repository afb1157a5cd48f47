"""ProPos (Huang et al., TPAMI 2022): BYOL-style target, PSA and PSL, k-means E-step.

Plugins: ``byol_target``, ``kmeans_e_step``, ``diffused_sampling`` (PSA) and
``prototype_aggregation`` (PSL).  Read in that order they follow the paper's method section.
"""
