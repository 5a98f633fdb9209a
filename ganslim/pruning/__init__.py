"""Ways to choose channels, each usable alone: CAT's one-step threshold (``onestep``), genetic channel
masks (``evolve``), width slicing (``slicing``), supernet training (``supernet``) and search
(``search``), and latency targets measured on the device (``device_aware``). The strategies in
:mod:`ganslim.strategies` compose them."""
