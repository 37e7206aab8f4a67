"""One module per kernel family (plus ``e2e``), each exposing ``cases(full, device) -> list[Case]``."""
