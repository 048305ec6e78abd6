"""The latency profiler: sweeps of an export's settings (sweep), one measured process each (worker), and the
reports (report, compare, trace)."""
