"""What every stage stands on: errors, logs, fault points, the filter spec, atomic writes, metrics and plots."""
