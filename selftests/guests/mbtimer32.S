/* SPDX-License-Identifier: GPL-2.0 */
/*
 * A multiboot (v1) test kernel that uses the PC platform the way small OS kernels do:
 * prints the multiboot memory map and command line and checks them (the map must hold
 * RAM at 0 and at 1 MiB matching mem_lower/mem_upper; the command line is the image
 * path, then optionally "ticks=N code=C", default 100 and 0x21); masks the 8259s, enables its local APIC (xAPIC page at
 * 0xfee00000, paging off), routes I/O APIC pin 2 (ISA IRQ 0, as the MADT's override
 * says) to vector 0x30, programs PIT channel 0 for 1 kHz, takes N timer interrupts
 * with HLT in between, and exits through isa-debug-exit with code C.
 */
	.intel_syntax noprefix
	.code32
	.text
	.globl _start
	.set MB_FLAGS, 3			/* page-aligned modules, memory information */
	.set APIC, 0xfee00000
	.set IOAPIC, 0xfec00000
	.set VEC, 0x30
	.balign 4
mbh:	.long	0x1badb002, MB_FLAGS, -(0x1badb002 + MB_FLAGS)
_start:
	mov	esp, 0x80000
	cmp	eax, 0x2badb002
	jne	fail
	mov	ebp, ebx
	lgdt	[gdtr]
	ljmp	0x08, offset 1f
1:	mov	ax, 0x10
	mov	ds, ax
	mov	es, ax
	mov	ss, ax
	lea	esi, s_hello
	call	puts

	/* Memory map: flag 6; entries of (size, base, length, type). */
	test	dword ptr [ebp], 1 << 6
	jz	fail
	mov	edi, [ebp + 48]
	mov	ebx, edi
	add	ebx, [ebp + 44]
	xor	ecx, ecx			/* checks passed: bit 0 low RAM, bit 1 high RAM */
2:	cmp	edi, ebx
	jae	3f
	lea	esi, s_mmap
	call	puts
	mov	eax, [edi + 4]
	call	puthex
	mov	al, ' '
	call	putc
	mov	eax, [edi + 12]
	call	puthex
	mov	al, ' '
	call	putc
	mov	eax, [edi + 20]
	call	putdec
	call	nl
	/* RAM at 0 of mem_lower KiB; RAM at 1 MiB of mem_upper KiB. */
	cmp	dword ptr [edi + 20], 1
	jne	4f
	cmp	dword ptr [edi + 4], 0
	jne	5f
	mov	eax, [ebp + 4]
	shl	eax, 10
	cmp	eax, [edi + 12]
	ja	4f
	or	ecx, 1
	jmp	4f
5:	cmp	dword ptr [edi + 4], 0x100000
	jne	4f
	mov	eax, [ebp + 8]
	shl	eax, 10
	cmp	eax, [edi + 12]
	jne	4f
	or	ecx, 2
4:	add	edi, [edi]
	add	edi, 4
	jmp	2b
3:	lea	esi, s_badmap
	cmp	ecx, 3
	jne	fail_msg

	/* Command line: the image path, then the arguments (printed: they do not depend
	 * on where the image lies). */
	test	dword ptr [ebp], 1 << 2
	jz	fail
	lea	esi, s_cmdline
	call	puts
	mov	esi, [ebp + 16]
9:	lodsb
	test	al, al
	jz	10f
	cmp	al, ' '
	jne	9b
	call	putc
	call	puts
10:	call	nl
	mov	esi, [ebp + 16]
	lea	edi, k_ticks
	call	find_arg
	mov	[ticks], eax
	mov	esi, [ebp + 16]
	lea	edi, k_code
	call	find_arg
	mov	[code], eax
	mov	esi, [ebp + 16]
	lea	edi, k_pic
	call	find_arg
	mov	[pic], eax
	/* Defaults: 100 interrupts, exit code 0x21. */
	cmp	dword ptr [ticks], 0
	jne	11f
	mov	dword ptr [ticks], 100
11:	cmp	dword ptr [code], 0
	jne	12f
	mov	dword ptr [code], 0x21
12:

	/* IDT: every vector to `spurious`, VEC to `timer`. */
	mov	edi, offset idt
	mov	ecx, 256
6:	mov	eax, offset spurious
	mov	word ptr [edi], ax
	mov	word ptr [edi + 2], 0x08
	mov	word ptr [edi + 4], 0x8e00
	shr	eax, 16
	mov	word ptr [edi + 6], ax
	add	edi, 8
	loop	6b
	mov	eax, offset timer
	mov	edi, offset idt + VEC * 8
	mov	word ptr [edi], ax
	shr	eax, 16
	mov	word ptr [edi + 6], ax
	lidt	[idtr]

	/* Local APIC on (spurious vector 0xff). */
	mov	dword ptr [APIC + 0xf0], 0x1ff
	cmp	dword ptr [pic], 0
	jne	13f
	/* 8259s masked; I/O APIC pin 2 -> VEC. */
	mov	al, 0xff
	out	0x21, al
	out	0xa1, al
	mov	dword ptr [IOAPIC], 0x10 + 2 * 2
	mov	dword ptr [IOAPIC + 0x10], VEC
	mov	dword ptr [IOAPIC], 0x11 + 2 * 2
	mov	dword ptr [IOAPIC + 0x10], 0
	lea	esi, s_setup
	call	puts
	jmp	14f
13:	/* pic=1: the 8259s at VEC (master) and VEC + 8, IRQ 0 unmasked, through LINT0
	 * in ExtINT mode (virtual wire); the I/O APIC pin stays masked. */
	mov	al, 0x11
	out	0x20, al
	out	0xa0, al
	mov	al, VEC
	out	0x21, al
	mov	al, VEC + 8
	out	0xa1, al
	mov	al, 4
	out	0x21, al
	mov	al, 2
	out	0xa1, al
	mov	al, 1
	out	0x21, al
	out	0xa1, al
	mov	al, 0xfe
	out	0x21, al
	mov	al, 0xff
	out	0xa1, al
	mov	dword ptr [APIC + 0x350], 0x700
	lea	esi, s_setup_pic
	call	puts
14:

	/* PIT channel 0, mode 2, 1193 ticks: 1 kHz. */
	mov	al, 0x34
	out	0x43, al
	mov	al, 1193 & 0xff
	out	0x40, al
	mov	al, 1193 >> 8
	out	0x40, al

	cli
7:	mov	eax, [count]
	cmp	eax, [ticks]
	jae	8f
	sti
	hlt
	cli
	jmp	7b
8:	/* Stop the PIT (mode 0, never reloaded) and the pin. */
	mov	al, 0x30
	out	0x43, al
	mov	dword ptr [IOAPIC], 0x10 + 2 * 2
	mov	dword ptr [IOAPIC + 0x10], 1 << 16
	lea	esi, s_done
	call	puts
	mov	eax, [ticks]
	call	putdec
	lea	esi, s_irqs
	call	puts
	mov	eax, [code]
	out	0xf4, al
	hlt

timer:
	inc	dword ptr [count]
	cmp	dword ptr [pic], 0
	jne	1f
	mov	dword ptr [APIC + 0xb0], 0
	iret
1:	push	eax
	mov	al, 0x20
	out	0x20, al
	pop	eax
	iret

spurious:
	iret

/* find_arg(esi = command line, edi = "key=") -> eax: the decimal number after it (0). */
find_arg:
	push	ebx
	push	ecx
1:	cmp	byte ptr [esi], 0
	je	5f
	push	esi
	push	edi
2:	mov	al, [edi]
	test	al, al
	jz	3f
	cmp	al, [esi]
	jne	4f
	inc	esi
	inc	edi
	jmp	2b
3:	add	esp, 8
	xor	eax, eax
6:	movzx	ecx, byte ptr [esi]
	sub	ecx, '0'
	cmp	ecx, 9
	ja	7f
	imul	eax, eax, 10
	add	eax, ecx
	inc	esi
	jmp	6b
4:	pop	edi
	pop	esi
	inc	esi
	jmp	1b
5:	xor	eax, eax
7:	pop	ecx
	pop	ebx
	ret

fail_msg:
	call	puts
fail:
	lea	esi, s_fail
	call	puts
	mov	al, 1
	out	0xf4, al
	hlt

puthex:
	push	ecx
	push	eax
	mov	al, '0'
	call	putc
	mov	al, 'x'
	call	putc
	pop	eax
	mov	ecx, 8
1:	rol	eax, 4
	push	eax
	and	al, 0xf
	add	al, '0'
	cmp	al, '9'
	jbe	2f
	add	al, 'a' - '9' - 1
2:	call	putc
	pop	eax
	loop	1b
	pop	ecx
	ret

putdec:
	push	eax
	push	ebx
	push	ecx
	push	edx
	mov	ebx, 10
	xor	ecx, ecx
1:	xor	edx, edx
	div	ebx
	push	edx
	inc	ecx
	test	eax, eax
	jnz	1b
2:	pop	eax
	add	al, '0'
	call	putc
	loop	2b
	pop	edx
	pop	ecx
	pop	ebx
	pop	eax
	ret

nl:	mov	al, '\n'
putc:
	push	edx
	mov	dx, 0x3f8
	out	dx, al
	pop	edx
	ret

puts:
	push	esi
	push	eax
1:	lodsb
	test	al, al
	jz	2f
	call	putc
	jmp	1b
2:	pop	eax
	pop	esi
	ret

	.data
	.balign	8
gdt:	.quad	0
	.quad	0x00cf9a000000ffff
	.quad	0x00cf92000000ffff
gdtr:	.word	3 * 8 - 1
	.long	gdt
idtr:	.word	256 * 8 - 1
	.long	idt
count:	.long	0
ticks:	.long	0
code:	.long	0
pic:	.long	0
k_pic:	.asciz	"pic="
s_setup_pic: .asciz "8259s at vector 0x30, IRQ 0 unmasked, LINT0 ExtINT, PIT at 1 kHz\n"
k_ticks: .asciz	"ticks="
k_code:	.asciz	"code="
s_hello: .asciz	"mbtimer32: multiboot kernel on a PC\n"
s_mmap:	.asciz	"mmap: "
s_badmap: .asciz "memory map disagrees with mem_lower/mem_upper\n"
s_cmdline: .asciz "cmdline args:"
s_setup: .asciz	"8259s masked, local APIC on, I/O APIC pin 2 -> vector 0x30, PIT at 1 kHz\n"
s_done:	.asciz	"timer: "
s_irqs:	.asciz	" interrupts\n"
s_fail:	.asciz	"mbtimer32: FAILED\n"
	.bss
	.balign	8
idt:	.space	256 * 8
