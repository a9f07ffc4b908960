"""The paper's evaluations (passkey, needle in a haystack, perplexity vs length, ablation of G and
w), with the baselines side by side, as resumable experiments: ``selfextend eval --help``."""
