"""What a run is judged and shown by: criteria, the report, CSV export, dashboards, charts."""
