"""clusterkit's built-in methods, installed as ``clusterkit_plugins``.

One folder per paper.  Each plugin is registered in the ``clusterkit.plugins``
entry-point group of clusterkit's pyproject.toml, exactly like a third party's.
Shared losses live once: ProPos's ``diffused_sampling`` and
``prototype_aggregation`` also serve DigPro and HaDis.
"""
