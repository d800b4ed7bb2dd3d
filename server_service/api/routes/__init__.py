"""One router per resource: health, edges, cycles, models, metrics."""
