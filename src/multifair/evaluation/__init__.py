"""Evaluation: auditing predictions (`multifair audit`), report pictures, and (later) predict,
evaluate, report and benchmark commands. Submodules are imported on demand so that importing
the package does not pull in matplotlib."""
