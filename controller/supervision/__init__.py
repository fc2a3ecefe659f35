"""supervisord glue: its XML-RPC API, the crash listener and the controller's watchdog."""
