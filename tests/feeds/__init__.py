"""Tests of the market-data and trade feeds (services.feeds)."""
