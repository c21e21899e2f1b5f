// The seed app's Socket.IO client, driven by tests/api/socketio.rs.
//
//   node client.js <url> [options as JSON]
//
// Prints one JSON line per thing that happens: {"event": "connect"|"upgrade"|"poll-stats"|
// "snapshot"|"ack"|"connect_error"|"disconnect"|"timeout", "data": …}. Exits by itself
// after `lifetimeMs` (default 30 s), so a test never waits for ever.
//
// Options: `io` (the options of `io(url, options)`; without it the call is the seed's own
// `io(url)`), `subscribe` (emitted after connecting, as `socket.emit('subscribe', …)`).
const { io } = require('socket.io-client');

const [url, optionsJson] = process.argv.slice(2);
const options = JSON.parse(optionsJson || '{}');
const print = (event, data) => process.stdout.write(JSON.stringify({ event, data }) + '\n');

setTimeout(() => {
  print('timeout');
  process.exit(2);
}, options.lifetimeMs || 30000);

// The seed's frontend, verbatim but for the URL:
//   const socket = io('http://localhost:3000');
//   socket.on('poll-stats', (data) => { /* { optionId, pollId, newCount } */ });
const socket = options.io ? io(url, options.io) : io(url);
socket.on('poll-stats', (data) => print('poll-stats', data));

socket.io.on('open', () => {
  socket.io.engine.on('upgrade', (transport) => print('upgrade', { transport: transport.name }));
});
socket.on('connect', () => {
  print('connect', { transport: socket.io.engine.transport.name });
  if (options.subscribe !== undefined) {
    socket.emit('subscribe', options.subscribe, (answer) => print('ack', answer));
  }
});
socket.on('snapshot', (data) => print('snapshot', data));
socket.on('connect_error', (err) => print('connect_error', { message: err.message }));
socket.on('disconnect', (reason) => print('disconnect', { reason }));
