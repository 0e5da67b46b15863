"""The notifications service: order events become notifications for the customer."""
