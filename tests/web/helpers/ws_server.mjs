// A small WebSocket server (RFC 6455, enough for tests) on Node's http module, so the page's connection
// code can be tested against a real socket without third-party packages.

import { createHash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { createServer } from 'node:http';

const GUID = '258EAFA5-E914-47DA-95CA-C5AB0DC85B11';
const OPCODE = { text: 0x1, binary: 0x2, close: 0x8, ping: 0x9, pong: 0xa };

function encodeFrame(opcode, payload) {
  const length = payload.length;
  let header;
  if (length < 126) {
    header = Buffer.from([0x80 | opcode, length]);
  } else if (length < 65536) {
    header = Buffer.alloc(4);
    header[0] = 0x80 | opcode;
    header[1] = 126;
    header.writeUInt16BE(length, 2);
  } else {
    header = Buffer.alloc(10);
    header[0] = 0x80 | opcode;
    header[1] = 127;
    header.writeBigUInt64BE(BigInt(length), 2);
  }
  return Buffer.concat([header, payload]);
}

/**
 * One accepted connection. Events: 'text' (string), 'binary' (Buffer), 'close' ({code, reason}). `url` is
 * the request's path and query.
 */
export class ServerConnection extends EventEmitter {
  constructor(socket) {
    super();
    this.socket = socket;
    this.pending = Buffer.alloc(0);
    this.closed = false;
    this.inbox = [];
    this.waiters = [];
    socket.on('data', (data) => this.onData(data));
    socket.on('close', () => this.finish(1006, ''));
    socket.on('error', () => {});
  }

  onData(data) {
    this.pending = Buffer.concat([this.pending, data]);
    for (;;) {
      const buffer = this.pending;
      if (buffer.length < 2) return;
      const opcode = buffer[0] & 0x0f;
      const masked = (buffer[1] & 0x80) !== 0;
      let length = buffer[1] & 0x7f;
      let offset = 2;
      if (length === 126) {
        if (buffer.length < 4) return;
        length = buffer.readUInt16BE(2);
        offset = 4;
      } else if (length === 127) {
        if (buffer.length < 10) return;
        length = Number(buffer.readBigUInt64BE(2));
        offset = 10;
      }
      const maskOffset = offset;
      if (masked) offset += 4;
      if (buffer.length < offset + length) return;
      const payload = Buffer.from(buffer.subarray(offset, offset + length));
      if (masked) for (let i = 0; i < length; i++) payload[i] ^= buffer[maskOffset + (i % 4)];
      this.pending = buffer.subarray(offset + length);
      this.onFrame(opcode, payload);
    }
  }

  onFrame(opcode, payload) {
    if (opcode === OPCODE.text) this.deliver({ kind: 'text', data: payload.toString('utf8') });
    else if (opcode === OPCODE.binary) this.deliver({ kind: 'binary', data: payload });
    else if (opcode === OPCODE.ping) this.write(OPCODE.pong, payload);
    else if (opcode === OPCODE.close) {
      const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
      const reason = payload.subarray(2).toString('utf8');
      if (!this.closeSent) this.write(OPCODE.close, payload.subarray(0, 2));
      this.socket.end();
      this.finish(code, reason);
    }
  }

  deliver(message) {
    this.emit(message.kind, message.data);
    const waiter = this.waiters.findIndex((w) => w.predicate(message));
    if (waiter >= 0) this.waiters.splice(waiter, 1)[0].resolve(message);
    else this.inbox.push(message);
  }

  /** The next message (already received or still to come) that satisfies `predicate`. */
  nextMessage(predicate = () => true) {
    const index = this.inbox.findIndex(predicate);
    if (index >= 0) return Promise.resolve(this.inbox.splice(index, 1)[0]);
    return new Promise((resolve) => this.waiters.push({ predicate, resolve }));
  }

  /** The next JSON text message of the given type. */
  async nextJson(type) {
    const message = await this.nextMessage((m) => m.kind === 'text' && JSON.parse(m.data).type === type);
    return JSON.parse(message.data);
  }

  finish(code, reason) {
    if (this.closed) return;
    this.closed = true;
    this.closeInfo = { code, reason };
    this.emit('close', this.closeInfo);
  }

  /** Resolves with {code, reason} once the connection has closed. */
  closedPromise() {
    if (this.closed) return Promise.resolve(this.closeInfo);
    return new Promise((resolve) => this.once('close', resolve));
  }

  write(opcode, payload) {
    if (!this.socket.destroyed) this.socket.write(encodeFrame(opcode, payload));
  }

  sendJson(message) {
    this.write(OPCODE.text, Buffer.from(JSON.stringify(message), 'utf8'));
  }

  sendText(text) {
    this.write(OPCODE.text, Buffer.from(text, 'utf8'));
  }

  sendBinary(bytes) {
    this.write(OPCODE.binary, Buffer.from(bytes));
  }

  /** A clean close handshake started by the server. */
  close(code, reason = '') {
    const payload = Buffer.alloc(2 + Buffer.byteLength(reason));
    payload.writeUInt16BE(code, 0);
    payload.write(reason, 2);
    this.write(OPCODE.close, payload);
    this.closeSent = true;
  }

  /** Drop the TCP connection without a close frame, as a network failure would. */
  destroy() {
    this.socket.destroy();
  }
}

/**
 * Start a server on a free port. `onConnection(connection, index)` runs for each accepted WebSocket.
 * Returns {url, connections, nextConnection(), close()}.
 */
export async function startWsServer(onConnection = () => {}) {
  const connections = [];
  const waiting = [];
  const server = createServer((request, response) => response.writeHead(404).end());
  server.on('upgrade', (request, socket) => {
    const accept = createHash('sha1')
      .update(request.headers['sec-websocket-key'] + GUID)
      .digest('base64');
    socket.write(
      'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n' +
        `Sec-WebSocket-Accept: ${accept}\r\n\r\n`,
    );
    socket.setNoDelay(true);
    const connection = new ServerConnection(socket);
    connection.url = request.url; // path and query, as the client asked for them
    connections.push(connection);
    const index = connections.length - 1;
    onConnection(connection, index);
    for (const waiter of waiting.filter((w) => w.index === index)) waiter.resolve(connection);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address();
  return {
    url: `ws://127.0.0.1:${port}/ws`,
    connections,
    /** Resolves with connection number `index` (0-based) once it has been accepted. */
    connection(index) {
      if (connections[index]) return Promise.resolve(connections[index]);
      return new Promise((resolve) => waiting.push({ index, resolve }));
    },
    close() {
      for (const c of connections) c.socket.destroy();
      return new Promise((resolve) => server.close(resolve));
    },
  };
}
