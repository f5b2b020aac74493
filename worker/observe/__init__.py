"""What operators watch: metrics, gauges read from the database, /metrics, health, logs."""
