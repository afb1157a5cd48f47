"""CC (Contrastive Clustering; Li et al., AAAI 2021): instance- and cluster-level contrast.

A shared backbone f maps the two augmented views x^a, x^b of a batch of B images to
features h = f(x).  Two heads sit on h:

* the instance head g_I (d -> d -> ReLU -> 128) gives z = norm(g_I(h)); each row of
  the 2B x 128 matrix [z^a; z^b] is one augmented sample, and the instance-level
  contrastive loss (NT-Xent, tau_I = 0.5) pulls the two views of an image together and
  pushes them from the other 2B - 2 samples;
* the cluster head g_C (d -> d -> ReLU -> K -> softmax) gives the soft assignments
  Y = g_C(h), a B x K matrix per view.  Its *rows* are the soft labels of the images;
  its *columns* are read as K cluster representations.  The cluster-level contrastive
  loss (cosine similarity, tau_C = 1.0) pulls column k of view a towards column k of
  view b and pushes it from the other 2K - 2 columns.  An entropy term on the
  clusters' batch masses (log K - H(P) per view) keeps the assignment from collapsing
  into one cluster.

The model is trained end to end on L = L_instance + L_cluster (Adam, lr 3e-4, no
weight decay, batch 256, 1000 epochs); there is no E-step and no k-means: a sample's
cluster is the argmax of the cluster head, so CC clusters online, one image at a time.

Plugins, in the order of the paper's method section:

    plugins:
      contrastive_heads: {instance_dim: 128}                         # the two heads
      instance_contrast: {temperature: 0.5, weight: 1.0}             # instance-level loss
      cluster_contrast:  {temperature: 1.0, weight: 1.0, entropy_weight: 1.0}   # cluster-level

``contrastive_heads`` reads the backbone features through the step output ``h``, so
a plugin that replaces ``h`` (PICI's masked ViT) trains the same heads and losses on
its own features; ``instance_contrast`` and ``cluster_contrast`` only read the step
outputs ``z`` and ``c`` that ``contrastive_heads`` provides.
"""
