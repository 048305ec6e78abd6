"""The latency profiler: sweeps of an export's settings (sweep), one measured process each (worker), the figures
of each configuration (summary), and the reports (report, compare, trace)."""
