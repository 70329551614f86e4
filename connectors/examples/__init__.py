"""Examples of wiring gatewatch's producer library into a gateway."""
