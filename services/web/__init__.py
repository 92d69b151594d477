"""The trading page (static/) and the small HTTP server that serves it with its helper endpoints."""
