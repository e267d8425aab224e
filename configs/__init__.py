"""rnorm's configurations, installed as the package ``rnorm.configs`` (see ``setup.py``).

The YAML files stay here, at the top of the repository; an install maps this folder onto
``rnorm.configs`` so that ``rnorm fit --config quickstart`` finds them anywhere (``rnorm configs``
lists them).
"""
