"""PICI (Zhang et al., arXiv 2401.13503): partial information discrimination and cross-level interaction.

PICI clusters images with a Transformer that only ever sees part of each image.  Two
augmented views of every image are split into 16x16 patches, half of the patches are
removed at random, and a ViT encoder (ViT-S/16, 6 blocks, fixed 2-D sin-cos positions)
turns the visible half into a [CLS] token h.  Three modules learn from these partial views:

* PISD, partial information self-discrimination: an MAE decoder rebuilds the removed
  patches from the visible tokens (normalised-pixel MSE on the masked patches, mean of
  the two views);
* PICD, partial information contrastive discrimination: CC's instance head (z, NT-Xent at
  tau 0.5 over the 2B views) and cluster head (c, NT-Xent over the 2K cluster columns at
  tau 1.0 plus the entropy term) on the [CLS] tokens of the masked views;
* CLI, cross-level interaction: k-means on the instance features z gives labels that,
  renamed onto the cluster head's argmax by Hungarian matching, train the cluster head by
  cross-entropy.

PICI = PISD + PICD + CLI over a masked ViT.  Which plugin reproduces which part:

    masked_vit                   the masked encoder; its [CLS] replaces the step output h   (this folder)
    partial_self_discrimination  PISD                                                       (this folder)
    contrastive_heads            PICD's heads z and c                                       (CC, plugins/cc)
    instance_contrast            PICD, instance level                                       (CC, plugins/cc)
    cluster_contrast             PICD, cluster level                                        (CC, plugins/cc)
    cross_level_interaction      CLI                                                        (this folder)

PICD *is* CC run on masked features, so PICI reuses CC's plugins unchanged: because
``masked_vit`` overrides ``h``, CC's heads read the masked encoder without knowing it.

Training has three stages (official: Adam lr 1e-4, batch 96, 1050 epochs), written as the
recipe's ``stages``:

    stages:
      - {name: pretrain, until: 200,  plugins: [partial_self_discrimination]}
      - {name: train,    until: 1000, plugins: [partial_self_discrimination, instance_contrast, cluster_contrast]}
      - {name: boost,    until: null, plugins: [instance_contrast, cluster_contrast, cross_level_interaction]}

``masked_vit`` and ``contrastive_heads`` are in no stage, so they are active throughout.
Clusters are read from the cluster head (argmax of c on the unmasked encoder's [CLS]).

Official quirks, each a named option that is off by default: test-time masking
(``masked_vit.test_time_masking``) and the double softmax in CLI's cross-entropy
(``cross_level_interaction.double_softmax``).  The official code also kept the checkpoint
of best ground-truth ACC during the boost stage; clusterkit reports the last epoch.
"""
