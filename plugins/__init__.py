"""seqzoo's built-in plugins. Each module registers through the ``seqzoo`` entry-point group and the
same hooks a third-party package uses; the core never imports them by name."""
