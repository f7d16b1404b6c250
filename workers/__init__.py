"""kvmesh write side: Celery tasks that apply fenced batches to target etcds."""
