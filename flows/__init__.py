"""Prefect flows: orchestration only (discover -> map resize -> map filter -> gallery)."""
